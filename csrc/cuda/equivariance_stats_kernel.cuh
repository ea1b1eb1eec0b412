// The CUDA kernel of equivariance_stats and its host-side preparation (no CUDA runtime calls),
// included by equivariance_stats_kernel.cu. Kept apart so that the kernel can also be compiled
// for the host under a small emulation of the CUDA execution model (used to check it without a
// GPU).
//
// Design:
//   - One launch per kind of element (StatsPath: integer maps whose valid positions fill a
//     rectangle, other integer maps, bilinear maps whose taps are a fixed pattern over a
//     rectangle, other bilinear maps), each its own instantiation of the kernel:
//     a register budget is per function, and one kernel for all three paths paid the bilinear
//     taps' registers (112 per thread, two blocks per SM) in the rectangle loop too.
//   - A disc (mask="disc") cuts the valid set of an element to the disc's shape: the host counts
//     it with the disc (affine.h, position_valid), so such an element takes a rectangle loop only
//     where the disc leaves its whole rectangle, and otherwise a per-position loop, which tests
//     the disc at each position.
//   - One block per (element k, channel tile, image b): blockIdx = (k, tile, b), elements
//     fastest. Every element of the transformed block a is read by exactly one thread, once; the
//     identity images are read through L2 (blocks of the same tile and image, one per element,
//     run side by side). The re-aligned identity is never materialized:
//     each thread computes its source index (integer maps) or bilinear taps on the fly.
//   - Channels contiguous (NHWC, NLC, channels_last): 32 lanes = 32 consecutive channels (coalesced
//     rows), 8 warps stride over positions; the 8 warps' partial sums merge in shared memory.
//     Positions contiguous (NCHW): each warp owns one channel, its lanes stride over positions
//     (coalesced); partial sums merge with warp shuffles.
//   - Single-pass float64 sums of values minus a per-channel shift (the value at the element's
//     first valid position, the same for every thread), so partial sums merge by plain addition
//     and the centring at the end keeps offset data exact (moments_from_shifted_sums). Values are
//     read (and bilinear values rounded) in float32, float64 for float64 features, as on the CPU.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "equifast/affine.h"
#include "equifast/moments.h"
#include "equifast/stats_args.h"

namespace equifast {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kComparisons = 3;
constexpr int kFields = 2 + 3 * kComparisons;  // sum a, sum a^2, then (sum b, sum b^2, sum ab) x 3

// The three loops of the kernel, one launch each.
enum StatsPath : int64_t {
  kRectanglePath = 0,  // integer map, valid positions fill a rectangle, 32-bit offsets suffice
  kIntegerPath = 1,    // other integer maps (wrapping, ragged valid sets, large strides)
  kBilinearPath = 2,   // other non-integer maps
  // A non-integer map whose four taps, at every valid position, are one pattern moved along a
  // rectangle with the same weights (a fractional translation, a quarter turn or flip about a
  // point off the grid: resnet-style grids put the centre of a quarter turn there), 32-bit
  // offsets suffice.
  kBilinearRectanglePath = 3,
  kNoPath = 4,  // nothing to do (no valid position, or subpixel 'skip'): never launched
};

// One element as the kernel sees it. count == 0: nothing to do (no valid position, or a
// non-integer map with subpixel 'skip'); the statistics stay 0 and it is not launched.
struct DeviceElement {
  SourceMap map;
  int64_t index;             // k: its block of images and its rows of the output
  int64_t path;              // StatsPath
  int64_t count;             // valid positions
  int64_t first_x, first_y;  // the first valid position (row-major): the shifts are read there
  // Integer maps: offsets (strides of the features) of the first valid position and of its
  // source, where the shifts are read.
  int64_t first_at, first_from;
  // kRectanglePath: an integer map without wrapping whose valid positions fill the rectangle
  // [rect_x0, rect_x0 + rect_w) x [rect_y0, rect_y0 + rect_h) (translations, quarter turns and
  // flips under crop). Its source offset is then linear in (x, y), from_dx x + from_dy y + from_0
  // in the strides of the features, and the kernel walks the rectangle without per-position
  // index maps or validity tests, in 32-bit offsets (the host checks that they fit).
  int64_t rect_x0, rect_y0, rect_w, rect_h;
  int64_t from_dx, from_dy, from_0;
  // kBilinearRectanglePath: the rectangle walk above gives the offset of tap (y0, x0) (first_from
  // at the first valid position); the other taps lie tap_dx, tap_dy and both further, all with
  // the weights `weight` (order of BilinearTaps). A tap step is 0 along an axis whose weights
  // of the far neighbours are 0 (no fraction along it): the kernel then reads the near
  // neighbour twice, times 0, where the other path reads a clamped or next row, times 0.
  int64_t tap_dx, tap_dy;
  double weight[4];
};

struct StatsParams {
  int64_t channels, grid_h, grid_w, batch, elements;
  int64_t stride_n, stride_c, stride_y, stride_x;
  int64_t identity_stride_n;  // between the identity images (those of feats, or `reference`)
  bool with_inv, with_chance;
};

// The source of output position (x, y) of element `map`: either one exact offset or four
// bilinear taps, offsets in the strides of feats. Returns validity.
struct Taps {
  int64_t offset[4];
  double weight[4];
  bool exact;
};

__device__ __forceinline__ bool source_taps(const SourceMap& map, const SampleGrid& grid, int64_t x,
                                            int64_t y, int64_t sy, int64_t sx, Taps& taps) {
  taps.exact = map.exact != 0;
  if (taps.exact) {
    int64_t ix, iy;
    apply_exact_map(map, x, y, ix, iy);
    const ExactTap tap = exact_tap(ix, iy, grid);
    taps.offset[0] = tap.iy * sy + tap.ix * sx;
    return tap.inside && inside_discs(map, static_cast<double>(x), static_cast<double>(y),
                                      static_cast<double>(ix), static_cast<double>(iy));
  }
  double fx, fy;
  apply_map(map, static_cast<double>(x), static_cast<double>(y), fx, fy);
  const BilinearTaps t = bilinear_taps(fx, fy, grid);
  taps.offset[0] = t.y0 * sy + t.x0 * sx;
  taps.offset[1] = t.y0 * sy + t.x1 * sx;
  taps.offset[2] = t.y1 * sy + t.x0 * sx;
  taps.offset[3] = t.y1 * sy + t.x1 * sx;
  taps.weight[0] = t.w00;
  taps.weight[1] = t.w01;
  taps.weight[2] = t.w10;
  taps.weight[3] = t.w11;
  return t.inside && inside_discs(map, static_cast<double>(x), static_cast<double>(y), fx, fy);
}

// The bilinear blend of four tap values, in the reference's order,
// ((v00 w00 + v01 w01) + v10 w10) + v11 w11, in float64 rounded once (as on the CPU): a map that
// is constant in exact arithmetic stays exactly constant, so its spread is exactly 0 rather than
// float32 rounding noise.
template <typename value_t, typename scalar_t>
__device__ __forceinline__ value_t blend(const scalar_t* values, const double* weights) {
  double value = static_cast<double>(values[0]) * weights[0];
  value += static_cast<double>(values[1]) * weights[1];
  value += static_cast<double>(values[2]) * weights[2];
  value += static_cast<double>(values[3]) * weights[3];
  return static_cast<value_t>(value);
}

template <typename value_t, typename scalar_t>
__device__ __forceinline__ value_t sample(const scalar_t* image, const Taps& taps) {
  if (taps.exact) return static_cast<value_t>(image[taps.offset[0]]);
  const scalar_t values[4] = {image[taps.offset[0]], image[taps.offset[1]],
                              image[taps.offset[2]], image[taps.offset[3]]};
  return blend<value_t>(values, taps.weight);
}

// Positions a thread handles per step of the integer-map loop: their loads are all issued
// before any of them is accumulated, so that a warp waits for memory once per kUnroll positions.
// (One position per step left the kernel latency-bound: on an H200 the float32 and bfloat16
// timings were the same, at about 10% of the copy bandwidth.)
constexpr int kUnroll = 4;

// Adds one compared pair (a, b) to the shifted sums of comparison `i`.
__device__ __forceinline__ void add_pair(double* sums, int i, double a, double b) {
  sums[2 + 3 * i] += b;
  sums[3 + 3 * i] += b * b;
  sums[4 + 3 * i] += a * b;
}

// Reads kCount positions (all loads first) and adds the live ones to the shifted sums: `at` is
// the position in the compared images, `from` its source in the identity images (both offsets
// in the strides of the features, in bounds also where not live). live == nullptr: all are live
// (the rectangle loop's full steps: no tests, no selects).
template <typename value_t, int kCount, typename offset_t, typename scalar_t>
__device__ __forceinline__ void add_positions(const StatsParams& p, const scalar_t* image,
                                              const scalar_t* id_b, const scalar_t* id_next,
                                              const offset_t* at, const offset_t* from,
                                              const bool* live, double shift_a, double shift_eq,
                                              double shift_inv, double shift_chance,
                                              double* sums) {
  value_t a_values[kCount], eq_values[kCount], inv_values[kCount], chance_values[kCount];
#pragma unroll
  for (int u = 0; u < kCount; ++u) {
    a_values[u] = static_cast<value_t>(image[at[u]]);
    eq_values[u] = static_cast<value_t>(id_b[from[u]]);
    inv_values[u] = p.with_inv ? static_cast<value_t>(id_b[at[u]]) : value_t(0);
    chance_values[u] = p.with_chance ? static_cast<value_t>(id_next[from[u]]) : value_t(0);
  }
#pragma unroll
  for (int u = 0; u < kCount; ++u) {
    if (live != nullptr && !live[u]) continue;
    const double a = static_cast<double>(a_values[u]) - shift_a;
    sums[0] += a;
    sums[1] += a * a;
    add_pair(sums, 0, a, static_cast<double>(eq_values[u]) - shift_eq);
    if (p.with_inv) add_pair(sums, 1, a, static_cast<double>(inv_values[u]) - shift_inv);
    if (p.with_chance) add_pair(sums, 2, a, static_cast<double>(chance_values[u]) - shift_chance);
  }
}

// The walk of the rectangle paths: one thread's positions first, first + step, ... of the
// rectangle, row-major, kCount at a time, then the last few one at a time; visit(at, from, count)
// gets the offsets of `count` positions (std::integral_constant). Both offsets advance by
// additions only, in 32 bits: the integer index maps of accumulate_exact took half the SM's
// integer pipeline on an H200 (ncu), for what is a translation of the source pointer here. The
// thread's count of positions is known up front, so the full steps need no end tests.
template <int kCount, typename Visit>
__device__ __forceinline__ void walk_rectangle(const DeviceElement& element, const StatsParams& p,
                                               int first, int step, Visit&& visit) {
  const int rect_w = static_cast<int>(element.rect_w);
  const int positions = static_cast<int>(element.rect_w * element.rect_h);
  if (first >= positions) return;
  const int mine = (positions - 1 - first) / step + 1;  // this thread's positions
  const int step_y = step / rect_w;
  const int step_x = step - step_y * rect_w;
  const int sx = static_cast<int>(p.stride_x), sy = static_cast<int>(p.stride_y);
  const int fx = static_cast<int>(element.from_dx), fy = static_cast<int>(element.from_dy);
  int x = first % rect_w;  // column in the rectangle; the row lives in the offsets
  const int gx = static_cast<int>(element.rect_x0) + x;
  const int gy = static_cast<int>(element.rect_y0) + first / rect_w;
  int at = gx * sx + gy * sy;
  int from = gx * fx + gy * fy + static_cast<int>(element.from_0);
  const int at_step = step_x * sx + step_y * sy, from_step = step_x * fx + step_y * fy;
  const int at_carry = sy - rect_w * sx, from_carry = fy - rect_w * fx;  // next row
  // The thread's next position: one step along the rows, with at most one carry to the next.
  const auto advance = [&] {
    x += step_x;
    at += at_step;
    from += from_step;
    if (x >= rect_w) {
      x -= rect_w;
      at += at_carry;
      from += from_carry;
    }
  };
  int done = 0;
  for (; done + kCount <= mine; done += kCount) {
    int at_u[kCount], from_u[kCount];
#pragma unroll
    for (int u = 0; u < kCount; ++u) {
      at_u[u] = at;
      from_u[u] = from;
      advance();
    }
    visit(at_u, from_u, std::integral_constant<int, kCount>{});
  }
  for (; done < mine; ++done) {
    visit(&at, &from, std::integral_constant<int, 1>{});
    advance();
  }
}

// The rectangle loop (kRectanglePath), kUnroll positions per step.
template <typename value_t, typename scalar_t>
__device__ __forceinline__ void accumulate_rectangle(
    const DeviceElement& element, const StatsParams& p, const scalar_t* image,
    const scalar_t* id_b, const scalar_t* id_next, int first, int step, double shift_a,
    double shift_eq, double shift_inv, double shift_chance, double* sums) {
  walk_rectangle<kUnroll>(element, p, first, step, [&](const int* at, const int* from, auto count) {
    add_positions<value_t, decltype(count)::value>(p, image, id_b, id_next, at, from, nullptr,
                                                   shift_a, shift_eq, shift_inv, shift_chance,
                                                   sums);
  });
}

// Positions per step of the bilinear rectangle loop: ten loads each, so two keep about as many
// loads in flight as the integer loops' kUnroll positions of four loads (ptxas, sm_90: 96-116
// registers, two blocks of 256 threads per SM, as for the per-position bilinear loop).
constexpr int kBilinearUnroll = 2;

// The bilinear rectangle loop (kBilinearRectanglePath): the rectangle walk, each position's
// four taps at from + (0, tap_dx, tap_dy, tap_dx + tap_dy) with the element's weights, blended
// as the bilinear loop blends them (the same values, the same order), all loads of a step
// issued first. No per-position map, floor, weights or validity: the host checked that they
// come out the same at every valid position (make_device_elements).
template <typename value_t, typename scalar_t>
__device__ __forceinline__ void accumulate_bilinear_rectangle(
    const DeviceElement& element, const StatsParams& p, const scalar_t* image,
    const scalar_t* id_b, const scalar_t* id_next, int first, int step, double shift_a,
    double shift_eq, double shift_inv, double shift_chance, double* sums) {
  const int tx = static_cast<int>(element.tap_dx), ty = static_cast<int>(element.tap_dy);
  const int taps[4] = {0, tx, ty, tx + ty};
  walk_rectangle<kBilinearUnroll>(element, p, first, step, [&](const int* at, const int* from,
                                                               auto count) {
    constexpr int kCount = decltype(count)::value;
    scalar_t a_raw[kCount], inv_raw[kCount], eq_raw[kCount][4], chance_raw[kCount][4];
#pragma unroll
    for (int u = 0; u < kCount; ++u) {
      a_raw[u] = image[at[u]];
      inv_raw[u] = p.with_inv ? id_b[at[u]] : scalar_t(0);
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        eq_raw[u][t] = id_b[from[u] + taps[t]];
        chance_raw[u][t] = p.with_chance ? id_next[from[u] + taps[t]] : scalar_t(0);
      }
    }
#pragma unroll
    for (int u = 0; u < kCount; ++u) {
      const double a = static_cast<double>(static_cast<value_t>(a_raw[u])) - shift_a;
      sums[0] += a;
      sums[1] += a * a;
      add_pair(sums, 0, a,
               static_cast<double>(blend<value_t>(eq_raw[u], element.weight)) - shift_eq);
      if (p.with_inv) {
        add_pair(sums, 1, a, static_cast<double>(static_cast<value_t>(inv_raw[u])) - shift_inv);
      }
      if (p.with_chance) {
        add_pair(sums, 2, a,
                 static_cast<double>(blend<value_t>(chance_raw[u], element.weight)) -
                     shift_chance);
      }
    }
  });
}

// A thread's walk over the grid, row-major: positions first, first + step, ... as (x, y), advanced
// by additions (no division per position; step_x < grid_w, so one carry at most).
struct GridWalk {
  int x, y, step_x, step_y, grid_w;
  __device__ __forceinline__ GridWalk(int first, int step, int grid_w_)
      : x(first % grid_w_), y(first / grid_w_), step_x(step % grid_w_), step_y(step / grid_w_),
        grid_w(grid_w_) {}
  __device__ __forceinline__ void advance() {
    x += step_x;
    y += step_y;
    if (x >= grid_w) {
      x -= grid_w;
      ++y;
    }
  }
};

// The integer-map loop for other integer maps (wrapping, or valid positions that do not fill a
// rectangle): one thread's positions (first, first + step, ...) of the grid. Row and column
// advance by adding (no division per position); positions past the end and invalid ones read a
// clamped in-grid address and are left out of the sums (never multiplied by 0, so that a
// non-finite value at an invalid position cannot leak in).
template <typename value_t, typename scalar_t>
__device__ __forceinline__ void accumulate_exact(
    const DeviceElement& element, const StatsParams& p, const scalar_t* image,
    const scalar_t* id_b, const scalar_t* id_next, int first, int step, double shift_a,
    double shift_eq, double shift_inv, double shift_chance, double* sums) {
  const SampleGrid grid = feature_grid(p.grid_h, p.grid_w, element.map.wrap != 0);
  // 32-bit position arithmetic (the host checks that the grid has fewer than 2^31 positions).
  const int positions = static_cast<int>(p.grid_h * p.grid_w);
  if (positions == 0) return;
  GridWalk walk(first, step, static_cast<int>(p.grid_w));
  for (int base = first; base < positions; base += kUnroll * step) {
    int64_t at[kUnroll], from[kUnroll];
    bool live[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const bool in_range = base + u * step < positions;
      int64_t ix, iy;
      apply_exact_map(element.map, walk.x, walk.y, ix, iy);
      const ExactTap tap = exact_tap(ix, iy, grid);  // indices clamped into the grid
      live[u] = in_range && tap.inside &&
                inside_discs(element.map, static_cast<double>(walk.x), static_cast<double>(walk.y),
                             static_cast<double>(ix), static_cast<double>(iy));
      at[u] = in_range ? walk.y * p.stride_y + walk.x * p.stride_x : 0;
      from[u] = tap.iy * p.stride_y + tap.ix * p.stride_x;
      walk.advance();
    }
    add_positions<value_t, kUnroll>(p, image, id_b, id_next, at, from, live, shift_a, shift_eq,
                                    shift_inv, shift_chance, sums);
  }
}

// The bilinear loop (non-integer maps): one position per step, its ten loads issued together.
// Two positions per step, as in the integer loops, took the kernel from 112 to 147 registers
// (ptxas, sm_90): one block of 256 threads per SM instead of two.
template <typename value_t, typename scalar_t>
__device__ __forceinline__ void accumulate_bilinear(
    const DeviceElement& element, const StatsParams& p, const scalar_t* image,
    const scalar_t* id_b, const scalar_t* id_next, int first, int step, double shift_a,
    double shift_eq, double shift_inv, double shift_chance, double* sums) {
  const SampleGrid grid = feature_grid(p.grid_h, p.grid_w, element.map.wrap != 0);
  const int positions = static_cast<int>(p.grid_h * p.grid_w);
  if (positions == 0) return;
  GridWalk walk(first, step, static_cast<int>(p.grid_w));
  for (int position = first; position < positions; position += step, walk.advance()) {
    Taps taps;
    if (!source_taps(element.map, grid, walk.x, walk.y, p.stride_y, p.stride_x, taps)) continue;
    const int64_t at = walk.y * p.stride_y + walk.x * p.stride_x;
    const scalar_t a_raw = image[at];
    const scalar_t inv_raw = p.with_inv ? id_b[at] : scalar_t(0);
    scalar_t eq_raw[4], chance_raw[4];
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      eq_raw[t] = id_b[taps.offset[t]];
      chance_raw[t] = p.with_chance ? id_next[taps.offset[t]] : scalar_t(0);
    }
    const double a = static_cast<double>(static_cast<value_t>(a_raw)) - shift_a;
    sums[0] += a;
    sums[1] += a * a;
    add_pair(sums, 0, a, static_cast<double>(blend<value_t>(eq_raw, taps.weight)) - shift_eq);
    if (p.with_inv) {
      add_pair(sums, 1, a, static_cast<double>(static_cast<value_t>(inv_raw)) - shift_inv);
    }
    if (p.with_chance) {
      add_pair(sums, 2, a,
               static_cast<double>(blend<value_t>(chance_raw, taps.weight)) - shift_chance);
    }
  }
}

template <int64_t kPath, bool kChannelsInner, typename scalar_t, int kMinBlocks = 1,
          typename value_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    stats_kernel(const scalar_t* __restrict__ identity, const scalar_t* __restrict__ blocks,
                 const DeviceElement* __restrict__ elements, StatsParams p,
                 double* __restrict__ out) {
  // identity: the identity block's image 0; blocks: element 0's image 0 (element k's block starts
  // k * batch images later), both at channel 0, position (0, 0). elements: this launch's elements,
  // all of path kPath, none empty.
  // Elements vary fastest over the blocks: the blocks running at the same time read the same
  // identity images, which then come from L2 rather than memory.
  const int64_t tile = blockIdx.y;
  const int64_t b = blockIdx.z;
  // The element in shared memory: read where needed rather than held in registers.
  __shared__ DeviceElement element;
  if (threadIdx.x == 0) element = elements[blockIdx.x];
  __syncthreads();
  const int64_t k = element.index;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  // Channels contiguous: lanes over channels, warps over positions. Otherwise: warps over
  // channels, lanes over positions.
  const int64_t c = kChannelsInner ? tile * 32 + lane : tile * kWarps + warp;
  const bool active = c < p.channels;
  const int64_t channel = active ? c : 0;  // idle lanes still take part in the merges

  const scalar_t* image = blocks + (k * p.batch + b) * p.stride_n + channel * p.stride_c;
  const scalar_t* id_b = identity + b * p.identity_stride_n + channel * p.stride_c;
  const scalar_t* id_next =
      identity + ((b + 1) % p.batch) * p.identity_stride_n + channel * p.stride_c;

  // Shifts: the values at the first valid position, the same in every thread of the channel.
  double shift_a, shift_eq, shift_inv = 0, shift_chance = 0;
  {
    const int64_t at = element.first_at;
    shift_a = static_cast<double>(static_cast<value_t>(image[at]));
    if (p.with_inv) shift_inv = static_cast<double>(static_cast<value_t>(id_b[at]));
    if constexpr (kPath == kBilinearPath || kPath == kBilinearRectanglePath) {
      Taps taps;
      if constexpr (kPath == kBilinearPath) {
        const SampleGrid grid = feature_grid(p.grid_h, p.grid_w, element.map.wrap != 0);
        source_taps(element.map, grid, element.first_x, element.first_y, p.stride_y, p.stride_x,
                    taps);
      } else {  // the element's tap pattern at its first valid position
        taps.exact = false;
        taps.offset[0] = element.first_from;
        taps.offset[1] = element.first_from + element.tap_dx;
        taps.offset[2] = element.first_from + element.tap_dy;
        taps.offset[3] = element.first_from + element.tap_dx + element.tap_dy;
        for (int t = 0; t < 4; ++t) taps.weight[t] = element.weight[t];
      }
      shift_eq = static_cast<double>(sample<value_t>(id_b, taps));
      if (p.with_chance) shift_chance = static_cast<double>(sample<value_t>(id_next, taps));
    } else {
      const int64_t from = element.first_from;
      shift_eq = static_cast<double>(static_cast<value_t>(id_b[from]));
      if (p.with_chance) shift_chance = static_cast<double>(static_cast<value_t>(id_next[from]));
    }
  }

  double sums[kFields];
#pragma unroll
  for (int f = 0; f < kFields; ++f) sums[f] = 0;
  if (active) {
    const int first = kChannelsInner ? warp : lane;
    const int step = kChannelsInner ? kWarps : 32;
    if constexpr (kPath == kRectanglePath) {
      accumulate_rectangle<value_t>(element, p, image, id_b, id_next, first, step, shift_a,
                                    shift_eq, shift_inv, shift_chance, sums);
    } else if constexpr (kPath == kIntegerPath) {
      accumulate_exact<value_t>(element, p, image, id_b, id_next, first, step, shift_a, shift_eq,
                                shift_inv, shift_chance, sums);
    } else if constexpr (kPath == kBilinearRectanglePath) {
      accumulate_bilinear_rectangle<value_t>(element, p, image, id_b, id_next, first, step,
                                             shift_a, shift_eq, shift_inv, shift_chance, sums);
    } else {
      accumulate_bilinear<value_t>(element, p, image, id_b, id_next, first, step, shift_a,
                                   shift_eq, shift_inv, shift_chance, sums);
    }
  }

  // Merge the partial sums of the threads of a channel (plain sums: they share the shifts).
  bool writer;
  if (kChannelsInner) {
    __shared__ double partial[kWarps][kFields][32];
#pragma unroll
    for (int f = 0; f < kFields; ++f) partial[warp][f][lane] = sums[f];
    __syncthreads();
    writer = warp == 0 && active;
    if (warp == 0) {
#pragma unroll
      for (int f = 0; f < kFields; ++f) {
        double total = 0;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) total += partial[w][f][lane];
        sums[f] = total;
      }
    }
  } else {
#pragma unroll
    for (int f = 0; f < kFields; ++f) {
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) {
        sums[f] += __shfl_xor_sync(0xffffffffu, sums[f], offset);
      }
    }
    writer = lane == 0 && active;
  }
  if (!writer) return;

  const double count = static_cast<double>(element.count);
  const double shifts[kComparisons] = {shift_eq, shift_inv, shift_chance};
  const bool wanted[kComparisons] = {true, p.with_inv, p.with_chance};
#pragma unroll
  for (int i = 0; i < kComparisons; ++i) {
    if (!wanted[i]) continue;
    const PairMoments<double> moments = moments_from_shifted_sums<double>(
        count, shift_a, shifts[i], sums[0],
        sums[2 + 3 * i], sums[1], sums[3 + 3 * i], sums[4 + 3 * i]);
    double* stats = out + (((i * p.elements + k) * p.batch + b) * p.channels + c) * 6;
    moments.store(stats);
  }
}

// Host: the largest |offset| the rectangle loop forms, in the strides of the features: its
// offsets run over the rectangle's columns and, past its last row, up to step / width + 1 rows
// further (a thread's last advance), step <= kThreads.
inline bool rectangle_offsets_fit_32_bits(const DeviceElement& element, const FeatureView& view) {
  const auto magnitude = [](int64_t v) { return v < 0 ? -v : v; };
  const int64_t columns = element.rect_x0 + element.rect_w + kThreads;
  const int64_t rows = element.rect_y0 + element.rect_h + kThreads + 1;
  const int64_t at_bound = magnitude(view.stride_x) * columns + magnitude(view.stride_y) * rows;
  const int64_t from_bound = magnitude(element.from_dx) * columns +
                             magnitude(element.from_dy) * rows + magnitude(element.from_0);
  const int64_t limit = (int64_t{1} << 31) - 1;
  return at_bound < limit && from_bound < limit && at_bound + from_bound < limit;
}

// Host: the bilinear rectangle loop's offsets fit in 32 bits: those of the rectangle loop, with
// the far taps' steps added to the source offsets.
inline bool bilinear_rectangle_offsets_fit_32_bits(const DeviceElement& element,
                                                   const FeatureView& view) {
  const auto magnitude = [](int64_t v) { return v < 0 ? -v : v; };
  DeviceElement widened = element;
  widened.from_0 = magnitude(element.from_0) + magnitude(element.tap_dx) +
                   magnitude(element.tap_dy);
  return rectangle_offsets_fit_32_bits(widened, view);
}

// Host: whether a non-integer map's bilinear taps are one pattern moved along its valid
// positions: the near neighbour (x0, y0) moving with the map's integer linear part, the far ones
// one column / row further (or, along an axis whose far weights are 0, anywhere), the weights
// the same to the bit. Fed every valid position in row-major order, with the very taps the
// bilinear loop would compute there (affine.h), so that where it holds the bilinear rectangle
// loop reads the same values and blends them with the same weights.
class BilinearPattern {
 public:
  explicit BilinearPattern(const SourceMap& map) {
    if (map.wrap) {  // taps that wrap around the window move with no single pattern
      holds_ = false;
      return;
    }
    const double linear[4] = {map.m[0], map.m[1], map.m[3], map.m[4]};
    for (int i = 0; i < 4; ++i) {
      // Exact, small integers only (quarter turns and flips come cleaned of rounding noise).
      if (!(std::fabs(linear[i]) <= 4096.0 && linear[i] == std::nearbyint(linear[i]))) {
        holds_ = false;
        return;
      }
      linear_[i] = static_cast<int64_t>(linear[i]);
    }
  }

  void add(int64_t x, int64_t y, const BilinearTaps& taps) {
    if (!holds_) return;
    const double weights[4] = {taps.w00, taps.w01, taps.w10, taps.w11};
    if (!started_) {
      started_ = true;
      first_x_ = x;
      first_y_ = y;
      x0_ = taps.x0;
      y0_ = taps.y0;
      for (int t = 0; t < 4; ++t) weight_[t] = weights[t];
      far_x_ = weights[1] != 0 || weights[3] != 0;
      far_y_ = weights[2] != 0 || weights[3] != 0;
    }
    const int64_t dx = x - first_x_, dy = y - first_y_;
    const int64_t x0 = x0_ + linear_[0] * dx + linear_[1] * dy;
    const int64_t y0 = y0_ + linear_[2] * dx + linear_[3] * dy;
    bool same = taps.x0 == x0 && taps.y0 == y0;
    if (far_x_) same = same && taps.x1 == x0 + 1;
    if (far_y_) same = same && taps.y1 == y0 + 1;
    for (int t = 0; t < 4; ++t) same = same && weights[t] == weight_[t];
    holds_ = same;
  }

  bool holds() const { return holds_ && started_; }

  // Fills the element's source walk and taps (in the strides of the features) from the pattern.
  void describe(DeviceElement& element, const FeatureView& view) const {
    const int64_t sx = view.stride_x, sy = view.stride_y;
    element.from_dx = linear_[0] * sx + linear_[2] * sy;
    element.from_dy = linear_[1] * sx + linear_[3] * sy;
    element.from_0 = (x0_ - linear_[0] * first_x_ - linear_[1] * first_y_) * sx +
                     (y0_ - linear_[2] * first_x_ - linear_[3] * first_y_) * sy;
    element.first_from = y0_ * sy + x0_ * sx;
    element.tap_dx = far_x_ ? sx : 0;
    element.tap_dy = far_y_ ? sy : 0;
    for (int t = 0; t < 4; ++t) element.weight[t] = weight_[t];
  }

 private:
  bool holds_ = true, started_ = false;
  bool far_x_ = false, far_y_ = false;
  int64_t linear_[4] = {0, 0, 0, 0};  // m[0], m[1], m[3], m[4]
  int64_t first_x_ = 0, first_y_ = 0, x0_ = 0, y0_ = 0;
  double weight_[4] = {0, 0, 0, 0};
};

// Host: per element, the map, its number of valid positions and the first one, with the very
// rule the kernel applies (affine.h), and its path. Returned in the order of the launches:
// rectangle elements first, then other integer maps, then bilinear rectangles, then other
// bilinear maps; empty elements are left out (their statistics stay 0).
inline std::vector<DeviceElement> make_device_elements(const StatsProblem& problem) {
  const FeatureView& view = problem.view;
  std::vector<DeviceElement> elements(problem.elements);
  for (int64_t k = 0; k < problem.elements; ++k) {
    DeviceElement& element = elements[k];
    element.map = problem.maps[k];
    element.index = k;
    element.path = kNoPath;
    element.count = 0;
    element.first_x = element.first_y = 0;
    element.first_at = element.first_from = 0;
    element.rect_x0 = element.rect_y0 = element.rect_w = element.rect_h = 0;
    element.from_dx = element.from_dy = element.from_0 = 0;
    element.tap_dx = element.tap_dy = 0;
    for (double& weight : element.weight) weight = 0;
    if (!element.map.exact && problem.skip_subpixel) continue;
    const SampleGrid grid = feature_grid(view.grid_h, view.grid_w, element.map.wrap != 0);
    BilinearPattern pattern(element.map);
    int64_t min_x = view.grid_w, max_x = -1, min_y = view.grid_h, max_y = -1;
    for (int64_t y = 0; y < view.grid_h; ++y) {
      for (int64_t x = 0; x < view.grid_w; ++x) {
        if (element.map.exact) {
          if (!position_valid(element.map, x, y, grid)) continue;
        } else {
          double sx, sy;
          apply_map(element.map, static_cast<double>(x), static_cast<double>(y), sx, sy);
          const BilinearTaps taps = bilinear_taps(sx, sy, grid);
          if (!taps.inside || !inside_discs(element.map, static_cast<double>(x),
                                            static_cast<double>(y), sx, sy)) {
            continue;
          }
          pattern.add(x, y, taps);
        }
        if (element.count == 0) {
          element.first_x = x;
          element.first_y = y;
        }
        ++element.count;
        min_x = std::min(min_x, x);
        max_x = std::max(max_x, x);
        min_y = std::min(min_y, y);
        max_y = std::max(max_y, y);
      }
    }
    if (element.count == 0) continue;
    element.first_at = element.first_y * view.stride_y + element.first_x * view.stride_x;
    const int64_t width = max_x - min_x + 1, height = max_y - min_y + 1;
    const bool rectangle = !element.map.wrap && element.count == width * height;
    if (!element.map.exact) {
      element.path = kBilinearPath;
      if (rectangle && pattern.holds()) {
        element.rect_x0 = min_x;
        element.rect_y0 = min_y;
        element.rect_w = width;
        element.rect_h = height;
        pattern.describe(element, view);
        if (bilinear_rectangle_offsets_fit_32_bits(element, view)) {
          element.path = kBilinearRectanglePath;
        }
      }
      continue;
    }
    int64_t ix, iy;
    apply_exact_map(element.map, element.first_x, element.first_y, ix, iy);
    const ExactTap tap = exact_tap(ix, iy, grid);
    element.first_from = tap.iy * view.stride_y + tap.ix * view.stride_x;
    element.path = kIntegerPath;
    // Valid positions of a non-wrapping integer map read their source unclamped
    // (exact_tap: clamping only moves invalid ones), so the source offset is linear in (x, y).
    if (rectangle) {
      const int64_t* m = element.map.im;
      element.rect_x0 = min_x;
      element.rect_y0 = min_y;
      element.rect_w = width;
      element.rect_h = height;
      element.from_dx = m[0] * view.stride_x + m[3] * view.stride_y;
      element.from_dy = m[1] * view.stride_x + m[4] * view.stride_y;
      element.from_0 = m[2] * view.stride_x + m[5] * view.stride_y;
      if (rectangle_offsets_fit_32_bits(element, view)) element.path = kRectanglePath;
    }
  }
  std::vector<DeviceElement> ordered;
  ordered.reserve(elements.size());
  for (const int64_t path :
       {kRectanglePath, kIntegerPath, kBilinearRectanglePath, kBilinearPath}) {
    for (const DeviceElement& element : elements) {
      if (element.path == path) ordered.push_back(element);
    }
  }
  return ordered;
}

// Host: the launches of an ordered element list, one per path present: (path, first element in
// the list, number of elements).
struct PathLaunch {
  int64_t path, start, count;
};

inline std::vector<PathLaunch> path_launches(const std::vector<DeviceElement>& ordered) {
  std::vector<PathLaunch> launches;
  for (int64_t i = 0; i < static_cast<int64_t>(ordered.size()); ++i) {
    if (launches.empty() || launches.back().path != ordered[i].path) {
      launches.push_back({ordered[i].path, i, 0});
    }
    ++launches.back().count;
  }
  return launches;
}

// Blocks of the rectangle kernel per SM that its registers must allow (__launch_bounds__): 3 caps
// them at 80 (some spilled), 1 leaves about 94 (two blocks per SM). Measured on an H200
// (bench_ops, 32 x 8 maps): 16-bit features gained from the third block (bfloat16 256 x 56 x 56
// 1.32 -> 1.12 ms, 512 x 28 x 28 727 -> 574 us, quarter turns 320 -> 255 us), float32 features
// lost (256 x 56 x 56 858 us -> 1.10 ms, NHWC 881 us -> 1.01 ms); 4 blocks (64 registers,
// heavy spills) were slower for both.
template <typename scalar_t>
constexpr int kRectangleMinBlocks = sizeof(scalar_t) == 2 ? 3 : 1;

// Host: calls launcher(run, kernel) for each launch of `runs`, with the kernel instantiated for
// its path (a __global__ function pointer: the CUDA launcher puts it in <<<...>>>, the emulation
// calls it).
template <bool kChannelsInner, typename scalar_t, typename Launcher>
void launch_stats_kernels(const std::vector<PathLaunch>& runs, Launcher&& launcher) {
  for (const PathLaunch& run : runs) {
    if (run.path == kRectanglePath) {
      launcher(run, &stats_kernel<kRectanglePath, kChannelsInner, scalar_t,
                                  kRectangleMinBlocks<scalar_t>>);
    } else if (run.path == kIntegerPath) {
      launcher(run, &stats_kernel<kIntegerPath, kChannelsInner, scalar_t>);
    } else if (run.path == kBilinearRectanglePath) {
      launcher(run, &stats_kernel<kBilinearRectanglePath, kChannelsInner, scalar_t>);
    } else {
      launcher(run, &stats_kernel<kBilinearPath, kChannelsInner, scalar_t>);
    }
  }
}

// Host: the kernel's parameters and launch shape. Channels contiguous (NHWC, NLC, channels_last):
// 32 channels per block; otherwise kWarps channels per block. Grid = (K, channel tiles, B), the
// K elements split over the launches of their paths (path_launches).
struct StatsLaunch {
  StatsParams params;
  bool channels_inner;
  int64_t blocks_x, blocks_y, blocks_z;
};

inline StatsLaunch make_stats_launch(const StatsProblem& problem, bool with_inv,
                                     bool with_chance) {
  const FeatureView& view = problem.view;
  StatsLaunch launch;
  StatsParams& params = launch.params;
  params.channels = view.channels;
  params.grid_h = view.grid_h;
  params.grid_w = view.grid_w;
  params.batch = problem.batch;
  params.elements = problem.elements;
  params.stride_n = view.stride_n;
  params.stride_c = view.stride_c;
  params.stride_y = view.stride_y;
  params.stride_x = view.stride_x;
  params.identity_stride_n = problem.identity_stride_n;
  params.with_inv = with_inv;
  params.with_chance = with_chance;
  const int64_t channel_step = view.stride_c < 0 ? -view.stride_c : view.stride_c;
  const int64_t position_step = view.stride_x < 0 ? -view.stride_x : view.stride_x;
  launch.channels_inner = view.channels > 1 && channel_step < position_step;
  const int64_t per_block = launch.channels_inner ? 32 : kWarps;
  launch.blocks_x = problem.elements;
  launch.blocks_y = (view.channels + per_block - 1) / per_block;
  launch.blocks_z = problem.batch;
  return launch;
}

}  // namespace
}  // namespace equifast
