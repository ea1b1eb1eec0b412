// Argument checks of transform_images and the per-element sampling setup they produce (host code,
// shared by the CPU and CUDA backends).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include "equifast/affine.h"
#include "equifast/checks.h"

namespace equifast {

// One element of transform_images: its map and where it samples. `window` is true for the
// circular protocol: the grid is the identity window itself (the source at the margin), so
// indices wrap inside it.
struct TransformElement {
  SourceMap map;
  SampleGrid grid;
  bool window;
};

struct TransformProblem {
  int64_t batch = 0, channels = 0, src_h = 0, src_w = 0;
  int64_t margin_y = 0, margin_x = 0, out_h = 0, out_w = 0;
  bool normalize = false;
  double mean[3] = {0, 0, 0};
  double std[3] = {1, 1, 1};
  std::vector<TransformElement> elements;
};

inline TransformProblem check_transform_args(const at::Tensor& src, const at::Tensor& source_affines,
                                             c10::IntArrayRef protocols, int64_t margin_y,
                                             int64_t margin_x, int64_t out_h, int64_t out_w,
                                             const std::optional<c10::ArrayRef<double>>& mean,
                                             const std::optional<c10::ArrayRef<double>>& std,
                                             c10::ScalarType out_dtype) {
  check_defined(src, "src");
  check_defined(source_affines, "source_affines");
  check_dim(src, "src", 4, "(B, 3, Hs, Ws)");
  check_size(src, "src", 1, 3, "RGB channels");
  check_dtype_in(src, "src", {at::kByte, at::kFloat, at::kDouble, at::kHalf, at::kBFloat16});
  TORCH_CHECK_VALUE(out_dtype == at::kFloat || out_dtype == at::kDouble || out_dtype == at::kHalf ||
                        out_dtype == at::kBFloat16,
                    "equifast: out_dtype must be one of float32, float64, float16, bfloat16 (the "
                    "model's dtype), but got ", out_dtype, ".");
  check_positive(out_h, "out_h");
  check_positive(out_w, "out_w");
  check_non_negative(margin_y, "margin_y");
  check_non_negative(margin_x, "margin_x");

  TransformProblem problem;
  problem.batch = src.size(0);
  problem.channels = src.size(1);
  problem.src_h = src.size(2);
  problem.src_w = src.size(3);
  problem.margin_y = margin_y;
  problem.margin_x = margin_x;
  problem.out_h = out_h;
  problem.out_w = out_w;
  TORCH_CHECK_VALUE(margin_y + out_h <= problem.src_h && margin_x + out_w <= problem.src_w,
                    "equifast: the identity window (margin_y, margin_x, out_h, out_w) = (", margin_y,
                    ", ", margin_x, ", ", out_h, ", ", out_w, ") does not fit in src of shape ",
                    src.sizes(), ": expected margin_y + out_h <= Hs and margin_x + out_w <= Ws. "
                    "Pass sources at least as large as the output plus the margin.");

  TORCH_CHECK_VALUE(mean.has_value() == std.has_value(),
                    "equifast: mean and std must be given together (or both None), but got mean ",
                    mean.has_value() ? "given" : "None", " and std ",
                    std.has_value() ? "given" : "None", ".");
  if (mean.has_value()) {
    check_list_size(*mean, "mean", problem.channels, "one per channel of src");
    check_list_size(*std, "std", problem.channels, "one per channel of src");
    problem.normalize = true;
    for (int64_t c = 0; c < problem.channels; ++c) {
      TORCH_CHECK_VALUE((*std)[c] != 0.0 && std::isfinite((*std)[c]), "equifast: std[", c,
                        "] must be finite and non-zero, but got ", (*std)[c], ".");
      problem.mean[c] = (*mean)[c];
      problem.std[c] = (*std)[c];
    }
  }

  check_device_cpu(source_affines, "source_affines");
  check_dtype(source_affines, "source_affines", at::kDouble);
  TORCH_CHECK(source_affines.dim() == 3 && source_affines.size(1) == 2 &&
                  source_affines.size(2) == 3,
              "equifast: source_affines must have shape (E, 2, 3) (one source map per element, "
              "identity included), but got shape ",
              source_affines.sizes(), ".");
  const int64_t elements = source_affines.size(0);
  check_list_size(protocols, "protocols", elements, "one per element of source_affines");
  const at::Tensor affines = source_affines.contiguous();
  const double* data = affines.data_ptr<double>();
  problem.elements.reserve(elements);
  for (int64_t e = 0; e < elements; ++e) {
    const int64_t protocol = protocols[e];
    TORCH_CHECK_VALUE(protocol == kProtocolCrop || protocol == kProtocolCircular ||
                          protocol == kProtocolZero,
                      "equifast: protocols[", e, "] must be 0 (crop), 1 (circular) or 2 (zero), "
                      "but got ", protocol, ".");
    TransformElement element;
    element.map = make_source_map(data + 6 * e, protocol == kProtocolCircular);
    element.window = protocol == kProtocolCircular;
    if (element.window) {
      // Circular: sample the identity window itself and wrap inside it.
      element.grid = SampleGrid{out_h, out_w, 0, 0, out_h, out_w, true, false};
    } else {
      // Crop reads the whole source (real pixels beyond the window); zero also requires the
      // source inside the window (outside it reads the fill, 0 after normalization).
      const bool bounded = protocol == kProtocolZero;
      element.grid = SampleGrid{problem.src_h, problem.src_w, margin_y, margin_x,
                                bounded ? out_h : problem.src_h, bounded ? out_w : problem.src_w,
                                false, bounded};
    }
    problem.elements.push_back(element);
  }
  return problem;
}

}  // namespace equifast
