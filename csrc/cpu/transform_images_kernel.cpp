// transform_images on the CPU.
//
// Resamples B sources under E source maps into (E * B, 3, out_h, out_w) normalized images,
// element-major, in the model's dtype and memory format (contract: equifast/ops/_reference.py).
//
// Design: tasks are (element, output row). A task first computes the row's sampling plan once
// (the shared affine.h rules: one tap for integer maps, four bilinear taps otherwise, weights
// already multiplied by the validity so that outside positions read the fill 0), then applies it
// to every image and channel. uint8 sources normalize through a 256-entry table per channel
// computed in float64, so integer maps reproduce the reference bit for bit.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "equifast/affine.h"
#include "equifast/checks.h"
#include "equifast/parallel.h"
#include "equifast/transform_args.h"

namespace equifast {
namespace {

// Source value -> normalized value in acc_t: a table for uint8, scale and shift otherwise.
template <typename scalar_t, typename acc_t>
struct Normalizer {
  acc_t scale[3], shift[3];
  acc_t table[3][256];

  Normalizer(const TransformProblem& problem) {
    for (int c = 0; c < 3; ++c) {
      const double mean = problem.normalize ? problem.mean[c] : 0.0;
      const double std = problem.normalize ? problem.std[c] : 1.0;
      scale[c] = static_cast<acc_t>(1.0 / std);
      shift[c] = static_cast<acc_t>(-mean / std);
      if constexpr (std::is_same_v<scalar_t, uint8_t>) {
        // The reference's arithmetic, in float64: (v / 255 - mean) / std.
        for (int v = 0; v < 256; ++v) {
          table[c][v] = static_cast<acc_t>((static_cast<double>(v) / 255.0 - mean) / std);
        }
      }
    }
  }

  inline acc_t operator()(scalar_t value, int c) const {
    if constexpr (std::is_same_v<scalar_t, uint8_t>) {
      return table[c][value];
    } else {
      return static_cast<acc_t>(value) * scale[c] + shift[c];
    }
  }
};

template <typename scalar_t, typename out_t, typename acc_t>
void transform_cpu_impl(const at::Tensor& src, const TransformProblem& problem, at::Tensor& out) {
  const int64_t batch = problem.batch, out_h = problem.out_h, out_w = problem.out_w;
  const int64_t elements = static_cast<int64_t>(problem.elements.size());
  const int64_t src_sn = src.stride(0), src_sc = src.stride(1), src_sh = src.stride(2),
                src_sw = src.stride(3);
  const int64_t out_sn = out.stride(0), out_sc = out.stride(1), out_sh = out.stride(2),
                out_sw = out.stride(3);
  const scalar_t* src_data = src.const_data_ptr<scalar_t>();
  out_t* out_data = out.data_ptr<out_t>();
  const Normalizer<scalar_t, acc_t> normalize(problem);

  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, batch * 3 * out_w));
  parallel_for(0, elements * out_h, grain, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> offsets(4 * out_w);
    std::vector<acc_t> weights(4 * out_w);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t e = task / out_h, y = task % out_h;
      const TransformElement& element = problem.elements[e];
      const bool exact = element.map.exact != 0;
      // The sampled grid: the window for circular elements, the whole source otherwise.
      const int64_t base =
          element.window ? problem.margin_y * src_sh + problem.margin_x * src_sw : 0;
      // The row's plan: offsets into an image plane of src, weights * validity.
      for (int64_t x = 0; x < out_w; ++x) {
        if (exact) {
          int64_t ix, iy;
          apply_exact_map(element.map, x, y, ix, iy);
          const ExactTap tap = exact_tap(ix, iy, element.grid);
          offsets[x] = base + tap.iy * src_sh + tap.ix * src_sw;
          weights[x] = tap.inside ? acc_t(1) : acc_t(0);
        } else {
          double sx, sy;
          apply_map(element.map, static_cast<double>(x), static_cast<double>(y), sx, sy);
          const BilinearTaps t = bilinear_taps(sx, sy, element.grid);
          const double inside = t.inside ? 1.0 : 0.0;
          int64_t* o = &offsets[4 * x];
          acc_t* w = &weights[4 * x];
          o[0] = base + t.y0 * src_sh + t.x0 * src_sw;
          o[1] = base + t.y0 * src_sh + t.x1 * src_sw;
          o[2] = base + t.y1 * src_sh + t.x0 * src_sw;
          o[3] = base + t.y1 * src_sh + t.x1 * src_sw;
          w[0] = static_cast<acc_t>(t.w00 * inside);
          w[1] = static_cast<acc_t>(t.w01 * inside);
          w[2] = static_cast<acc_t>(t.w10 * inside);
          w[3] = static_cast<acc_t>(t.w11 * inside);
        }
      }
      // A whole row of valid pixels read with one step (translations, flips): no per-pixel plan.
      bool run = exact;
      const int64_t step = out_w > 1 ? offsets[1] - offsets[0] : 0;
      for (int64_t x = 0; run && x < out_w; ++x) {
        run = weights[x] == acc_t(1) && offsets[x] == offsets[0] + x * step;
      }
      for (int64_t b = 0; b < batch; ++b) {
        for (int64_t c = 0; c < 3; ++c) {
          const scalar_t* plane = src_data + b * src_sn + c * src_sc;
          out_t* row = out_data + (e * batch + b) * out_sn + c * out_sc + y * out_sh;
          if (run) {
            const scalar_t* source = plane + offsets[0];
            if (out_sw == 1 && step == 1) {
              for (int64_t x = 0; x < out_w; ++x) {
                row[x] = static_cast<out_t>(normalize(source[x], c));
              }
            } else {
              for (int64_t x = 0; x < out_w; ++x) {
                row[x * out_sw] = static_cast<out_t>(normalize(source[x * step], c));
              }
            }
          } else if (exact) {
            for (int64_t x = 0; x < out_w; ++x) {
              row[x * out_sw] = static_cast<out_t>(normalize(plane[offsets[x]], c) * weights[x]);
            }
          } else {
            for (int64_t x = 0; x < out_w; ++x) {
              const int64_t* o = &offsets[4 * x];
              const acc_t* w = &weights[4 * x];
              // The reference's order: ((v00 w00 + v01 w01) + v10 w10) + v11 w11.
              acc_t value = normalize(plane[o[0]], c) * w[0];
              value += normalize(plane[o[1]], c) * w[1];
              value += normalize(plane[o[2]], c) * w[2];
              value += normalize(plane[o[3]], c) * w[3];
              row[x * out_sw] = static_cast<out_t>(value);
            }
          }
        }
      }
    }
  });
}

at::Tensor transform_images_cpu(const at::Tensor& src, const at::Tensor& source_affines,
                                c10::IntArrayRef protocols, int64_t margin_y, int64_t margin_x,
                                int64_t out_h, int64_t out_w,
                                std::optional<c10::ArrayRef<double>> mean,
                                std::optional<c10::ArrayRef<double>> std, c10::ScalarType out_dtype,
                                bool channels_last) {
  const TransformProblem problem = check_transform_args(
      src, source_affines, protocols, margin_y, margin_x, out_h, out_w, mean, std, out_dtype);
  check_device_cpu(src, "src");
  const int64_t elements = static_cast<int64_t>(problem.elements.size());
  at::Tensor out = at::empty({elements * problem.batch, problem.channels, out_h, out_w},
                             src.options().dtype(out_dtype),
                             channels_last ? at::MemoryFormat::ChannelsLast
                                           : at::MemoryFormat::Contiguous);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kByte, src.scalar_type(),
                                  "transform_images_cpu", [&] {
    using src_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "transform_images_cpu_out",
                                    [&] {
      using out_t = scalar_t;
      // float64 arithmetic when either side is float64, float32 otherwise.
      constexpr bool wide = std::is_same_v<src_t, double> || std::is_same_v<out_t, double>;
      using acc_t = std::conditional_t<wide, double, float>;
      transform_cpu_impl<src_t, out_t, acc_t>(src, problem, out);
    });
  });
  return out;
}

}  // namespace
}  // namespace equifast

TORCH_LIBRARY_IMPL(equifast, CPU, m) {
  m.impl("transform_images", &equifast::transform_images_cpu);
}
