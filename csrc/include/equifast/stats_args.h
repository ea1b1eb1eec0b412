// Argument checks of equivariance_stats and the strided view of feats they produce (host code,
// shared by the CPU and CUDA backends so that both reject the same inputs with the same words).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "equifast/affine.h"
#include "equifast/checks.h"

namespace equifast {

// feats seen as (images, channels, grid_h, grid_w) through strides (in elements), whatever the
// layout: element (n, c, y, x) sits at data + offset + n*stride_n + c*stride_c + y*stride_y +
// x*stride_x. Prefix tokens of NLC are skipped by `offset`.
struct FeatureView {
  int64_t images = 0, channels = 0, grid_h = 0, grid_w = 0;
  int64_t stride_n = 0, stride_c = 0, stride_y = 0, stride_x = 0;
  int64_t offset = 0;
};

// Everything a stats kernel needs, checked.
struct StatsProblem {
  FeatureView view;  // of feats (the view of `reference` differs only in stride_n)
  int64_t elements = 0;  // K
  int64_t batch = 0;     // B
  bool skip_subpixel = false;
  std::vector<SourceMap> maps;  // K source maps in feature-grid coordinates
  // Where the identity block is: the first `batch` images of feats, or a tensor of its own
  // (`reference`), whose images are identity_stride_n elements apart. Element k's block starts
  // at image element_start + k * batch of feats.
  bool separate_identity = false;
  int64_t identity_stride_n = 0;
  int64_t element_start = 0;
};

inline StatsProblem check_stats_args(const at::Tensor& feats, const at::Tensor& source_affines,
                                     c10::IntArrayRef wrap, int64_t batch,
                                     std::string_view layout, int64_t grid_h, int64_t grid_w,
                                     int64_t prefix, std::string_view subpixel,
                                     const std::optional<at::Tensor>& reference = std::nullopt,
                                     const std::optional<c10::ArrayRef<double>>& disc =
                                         std::nullopt) {
  check_defined(feats, "feats");
  check_defined(source_affines, "source_affines");
  check_dtype_in(feats, "feats", {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16});
  check_one_of(layout, "layout", {"NCHW", "NHWC", "NLC"});
  check_one_of(subpixel, "subpixel", {"bilinear", "skip"});
  check_positive(grid_h, "grid_h");
  check_positive(grid_w, "grid_w");
  check_non_negative(prefix, "prefix");
  check_positive(batch, "batch");

  StatsProblem problem;
  FeatureView& view = problem.view;
  if (layout == "NCHW") {
    check_dim(feats, "feats", 4, "(N, C, H, W) for layout 'NCHW'");
    TORCH_CHECK(feats.size(2) == grid_h && feats.size(3) == grid_w, "equifast: feats of shape ",
                      feats.sizes(), " (layout 'NCHW') does not match the grid (grid_h, grid_w) = (",
                      grid_h, ", ", grid_w, "): expected feats.shape[2:] == (", grid_h, ", ",
                      grid_w, ").");
    view.channels = feats.size(1);
    view.stride_c = feats.stride(1);
    view.stride_y = feats.stride(2);
    view.stride_x = feats.stride(3);
  } else if (layout == "NHWC") {
    check_dim(feats, "feats", 4, "(N, H, W, C) for layout 'NHWC'");
    TORCH_CHECK(feats.size(1) == grid_h && feats.size(2) == grid_w, "equifast: feats of shape ",
                      feats.sizes(), " (layout 'NHWC') does not match the grid (grid_h, grid_w) = (",
                      grid_h, ", ", grid_w, "): expected feats.shape[1:3] == (", grid_h, ", ",
                      grid_w, ").");
    view.channels = feats.size(3);
    view.stride_c = feats.stride(3);
    view.stride_y = feats.stride(1);
    view.stride_x = feats.stride(2);
  } else {  // NLC: (N, prefix + grid_h * grid_w, C), tokens row-major over the grid
    check_dim(feats, "feats", 3, "(N, L, C) for layout 'NLC'");
    TORCH_CHECK(feats.size(1) == prefix + grid_h * grid_w, "equifast: feats of shape ",
                      feats.sizes(), " (layout 'NLC') must have L = prefix + grid_h * grid_w = ",
                      prefix, " + ", grid_h, " * ", grid_w, " = ", prefix + grid_h * grid_w,
                      " tokens, but has ", feats.size(1), ".");
    view.channels = feats.size(2);
    view.stride_c = feats.stride(2);
    view.stride_y = grid_w * feats.stride(1);
    view.stride_x = feats.stride(1);
    view.offset = prefix * feats.stride(1);
  }
  view.images = feats.size(0);
  view.stride_n = feats.stride(0);
  view.grid_h = grid_h;
  view.grid_w = grid_w;

  check_device_cpu(source_affines, "source_affines");
  check_dtype(source_affines, "source_affines", at::kDouble);
  TORCH_CHECK(source_affines.dim() == 3 && source_affines.size(1) == 2 &&
                        source_affines.size(2) == 3,
                    "equifast: source_affines must have shape (K, 2, 3) (one source map per "
                    "element, identity excluded), but got shape ",
                    source_affines.sizes(), ".");
  const int64_t elements = source_affines.size(0);
  check_list_size(wrap, "wrap", elements, "one per element of source_affines");
  problem.separate_identity = reference.has_value() && reference->defined();
  if (problem.separate_identity) {
    const at::Tensor& identity = *reference;
    TORCH_CHECK(identity.device() == feats.device() && identity.scalar_type() ==
                    feats.scalar_type(), "equifast: reference must have the dtype and device of "
                    "feats (", feats.scalar_type(), " on ", feats.device(), "), but has ",
                    identity.scalar_type(), " on ", identity.device(), ".");
    bool same_image_shape = identity.dim() == feats.dim() && identity.size(0) == batch;
    bool same_strides = same_image_shape;
    for (int64_t d = 1; same_image_shape && d < feats.dim(); ++d) {
      same_image_shape = identity.size(d) == feats.size(d);
      // (a stride of an axis of size 1 is never used)
      same_strides = same_strides && (feats.size(d) <= 1 || identity.stride(d) == feats.stride(d));
    }
    TORCH_CHECK(same_image_shape, "equifast: reference holds the identity block: expected ",
                "shape (", batch, ", *feats.shape[1:]) with feats of shape ", feats.sizes(),
                ", but got shape ", identity.sizes(), ".");
    TORCH_CHECK(same_strides, "equifast: reference must lay out its images like feats (strides ",
                feats.strides().slice(1), " after the batch axis), but has strides ",
                identity.strides(), ".");
    TORCH_CHECK(view.images == elements * batch, "equifast: feats holds ", view.images,
                " images (shape ", feats.sizes(), "), but K * batch = ", elements, " * ", batch,
                " = ", elements * batch, " were expected: one block of `batch` images per element "
                "of source_affines (the identity block is `reference`).");
    problem.identity_stride_n = identity.stride(0);
    problem.element_start = 0;
  } else {
    TORCH_CHECK(view.images == (elements + 1) * batch, "equifast: feats holds ", view.images,
                " images (shape ", feats.sizes(), "), but (K + 1) * batch = (", elements,
                " + 1) * ", batch, " = ", (elements + 1) * batch,
                " were expected: the identity block first, then one block of `batch` images "
                "per element of source_affines.");
    problem.identity_stride_n = view.stride_n;
    problem.element_start = batch;
  }
  problem.elements = elements;
  problem.batch = batch;
  problem.skip_subpixel = subpixel == "skip";

  const at::Tensor affines = source_affines.contiguous();
  const double* data = affines.data_ptr<double>();
  problem.maps.reserve(elements);
  for (int64_t k = 0; k < elements; ++k) {
    problem.maps.push_back(make_source_map(data + 6 * k, wrap[k] != 0));
  }
  if (disc.has_value()) {
    const c10::ArrayRef<double> d = *disc;
    TORCH_CHECK(d.size() == 4, "equifast: disc must be 4 numbers (centre_x, centre_y, radius_x, ",
                "radius_y) in grid coordinates, but got ", d.size(), ".");
    TORCH_CHECK(std::isfinite(d[0]) && std::isfinite(d[1]) && std::isfinite(d[2]) &&
                    std::isfinite(d[3]) && d[2] > 0 && d[3] > 0,
                "equifast: disc must have a finite centre and finite positive radii, but got ",
                "(centre_x, centre_y, radius_x, radius_y) = ", d, ".");
    for (int64_t k = 0; k < elements; ++k) {
      TORCH_CHECK(wrap[k] == 0, "equifast: disc masks the border of the image, which a wrapping ",
                  "element (circular protocol) does not have: element ", k, " wraps.");
      set_disc(problem.maps[k], d.data());
    }
  }
  return problem;
}

}  // namespace equifast
