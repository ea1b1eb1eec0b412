// The CUDA kernel of transform_images and its host-side preparation (no CUDA runtime calls),
// included by transform_images_kernel.cu. Kept apart so that the kernel can also be compiled for
// the host under a small emulation of the CUDA execution model (used to check it without a GPU).
//
// Design: one thread per output pixel of one element (blockIdx.z = element). A thread computes
// its sampling taps once (one exact tap, or four bilinear taps with the validity folded into the
// weights) and applies them to every image and channel, so each output value is written once and
// neighbouring threads read neighbouring source pixels. uint8 sources normalize through a
// 3 x 256 table computed on the host in float64 and staged in shared memory.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "equifast/affine.h"
#include "equifast/transform_args.h"

namespace equifast {
namespace {

constexpr int kBlockX = 32;
constexpr int kBlockY = 8;

struct TransformParams {
  int64_t batch, out_h, out_w;
  int64_t margin_y, margin_x;
  int64_t src_sn, src_sc, src_sh, src_sw;
  int64_t out_sn, out_sc, out_sh, out_sw;
  double scale[3], shift[3];  // normalization of non-uint8 sources: v * scale + shift
};

template <typename scalar_t, typename out_t, typename acc_t>
__global__ void __launch_bounds__(kBlockX* kBlockY)
    transform_kernel(const scalar_t* __restrict__ src,
                     const TransformElement* __restrict__ elements,
                     const acc_t* __restrict__ table, TransformParams p, out_t* __restrict__ out) {
  constexpr bool kTable = std::is_same_v<scalar_t, uint8_t>;
  __shared__ acc_t lut[kTable ? 3 * 256 : 1];
  if constexpr (kTable) {
    for (int i = threadIdx.y * kBlockX + threadIdx.x; i < 3 * 256; i += kBlockX * kBlockY) {
      lut[i] = table[i];
    }
    __syncthreads();
  }
  const int64_t x = static_cast<int64_t>(blockIdx.x) * kBlockX + threadIdx.x;
  const int64_t y = static_cast<int64_t>(blockIdx.y) * kBlockY + threadIdx.y;
  const int64_t e = blockIdx.z;
  if (x >= p.out_w || y >= p.out_h) return;
  const TransformElement element = elements[e];
  // The sampled grid: the identity window for circular elements, the whole source otherwise.
  const int64_t base = element.window ? p.margin_y * p.src_sh + p.margin_x * p.src_sw : 0;

  int64_t offsets[4];
  acc_t weights[4];
  int taps;
  if (element.map.exact) {
    int64_t ix, iy;
    apply_exact_map(element.map, x, y, ix, iy);
    const ExactTap tap = exact_tap(ix, iy, element.grid);
    offsets[0] = base + tap.iy * p.src_sh + tap.ix * p.src_sw;
    weights[0] = tap.inside ? acc_t(1) : acc_t(0);
    taps = 1;
  } else {
    double sx, sy;
    apply_map(element.map, static_cast<double>(x), static_cast<double>(y), sx, sy);
    const BilinearTaps t = bilinear_taps(sx, sy, element.grid);
    const double inside = t.inside ? 1.0 : 0.0;
    offsets[0] = base + t.y0 * p.src_sh + t.x0 * p.src_sw;
    offsets[1] = base + t.y0 * p.src_sh + t.x1 * p.src_sw;
    offsets[2] = base + t.y1 * p.src_sh + t.x0 * p.src_sw;
    offsets[3] = base + t.y1 * p.src_sh + t.x1 * p.src_sw;
    weights[0] = static_cast<acc_t>(t.w00 * inside);
    weights[1] = static_cast<acc_t>(t.w01 * inside);
    weights[2] = static_cast<acc_t>(t.w10 * inside);
    weights[3] = static_cast<acc_t>(t.w11 * inside);
    taps = 4;
  }

  for (int64_t b = 0; b < p.batch; ++b) {
    out_t* pixel = out + (e * p.batch + b) * p.out_sn + y * p.out_sh + x * p.out_sw;
#pragma unroll
    for (int c = 0; c < 3; ++c) {
      const scalar_t* plane = src + b * p.src_sn + c * p.src_sc;
      const acc_t scale = static_cast<acc_t>(p.scale[c]);
      const acc_t shift = static_cast<acc_t>(p.shift[c]);
      // The reference's order: ((v00 w00 + v01 w01) + v10 w10) + v11 w11.
      acc_t value = 0;
      for (int t = 0; t < taps; ++t) {
        const scalar_t raw = plane[offsets[t]];
        acc_t normalized;
        if constexpr (kTable) {
          normalized = lut[c * 256 + raw];
        } else {
          normalized = static_cast<acc_t>(raw) * scale + shift;
        }
        value = t == 0 ? normalized * weights[0] : value + normalized * weights[t];
      }
      pixel[c * p.out_sc] = static_cast<out_t>(value);
    }
  }
}

// Host: the kernel's parameters (strides in elements of src and out).
inline TransformParams make_transform_params(const TransformProblem& problem,
                                             const int64_t* src_strides,
                                             const int64_t* out_strides) {
  TransformParams params;
  params.batch = problem.batch;
  params.out_h = problem.out_h;
  params.out_w = problem.out_w;
  params.margin_y = problem.margin_y;
  params.margin_x = problem.margin_x;
  params.src_sn = src_strides[0];
  params.src_sc = src_strides[1];
  params.src_sh = src_strides[2];
  params.src_sw = src_strides[3];
  params.out_sn = out_strides[0];
  params.out_sc = out_strides[1];
  params.out_sh = out_strides[2];
  params.out_sw = out_strides[3];
  for (int c = 0; c < 3; ++c) {
    const double mean_c = problem.normalize ? problem.mean[c] : 0.0;
    const double std_c = problem.normalize ? problem.std[c] : 1.0;
    params.scale[c] = 1.0 / std_c;
    params.shift[c] = -mean_c / std_c;
  }
  return params;
}

// Host: the 3 x 256 table of normalized uint8 values, computed with the reference's arithmetic
// in float64, stored as acc_t (float, or double when `wide`).
inline void fill_uint8_table(const TransformProblem& problem, bool wide, void* table) {
  for (int c = 0; c < 3; ++c) {
    const double mean_c = problem.normalize ? problem.mean[c] : 0.0;
    const double std_c = problem.normalize ? problem.std[c] : 1.0;
    for (int v = 0; v < 256; ++v) {
      const double value = (static_cast<double>(v) / 255.0 - mean_c) / std_c;
      if (wide) {
        static_cast<double*>(table)[c * 256 + v] = value;
      } else {
        static_cast<float*>(table)[c * 256 + v] = static_cast<float>(value);
      }
    }
  }
}

}  // namespace
}  // namespace equifast
