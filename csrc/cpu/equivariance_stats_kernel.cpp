// equivariance_stats on the CPU.
//
// For every element k, image b and channel c: the six statistics (count, mean_a, mean_b, m2_a,
// m2_b, c_ab) of a = feats of the transformed image against
//   eq:     b = the identity image's features, re-aligned by the source map of k,
//   inv:    b = the identity image's features, not moved,
//   chance: b = the re-aligned features of identity image (b + 1) % B,
// over the valid positions of k (contract: equifast/ops/_reference.py, DESIGN.md 1.2-1.3).
//
// Design:
//   - A plan per element, built once on the host and shared by all images and channels: the valid
//     positions as runs along x, with their exact source offsets (integer maps) or four bilinear
//     taps and weights (other maps). Index arithmetic is the shared affine.h code.
//   - Tasks are (image b, channel tile) and loop over the elements inside, so that the identity
//     tiles (images b and b + 1) stay in cache while each element's block is read once. The
//     re-aligned identity is never materialized: it is read through the plan's offsets (or
//     interpolated into a scratch of a few positions).
//   - Single pass: per channel, float64 sums of a - shift_a, (a - shift_a)^2 and, per comparison,
//     of b - shift_b, (b - shift_b)^2, (a - shift_a)(b - shift_b), where the shifts are the values
//     at the element's first valid position; centred in float64 at the end
//     (moments_from_shifted_sums). Values are read (and bilinear values rounded) in float32
//     (float64 for float64 features), then widened. The statistics then carry float32 rounding
//     only: none for values read in place, as in the reference; one rounding of each bilinear
//     value, which the reference interpolates in float64 (a relative error of about 6e-8 per
//     value, which shows in the statistics of channels that are nearly constant: measured on a
//     random-init LeViT, corr 1.8e-5 apart). Offset data (mean 1e4, spread 1) keeps its
//     correlation, a constant channel gives exactly 0, and scores that cancel (psnr of nearly
//     equal maps) agree with the reference path. float32 sums were 2x cheaper but off by ~1e-6
//     relative.
//   - Three loop nests by memory order, all vectorized (GCC/Clang vector extensions: 4 x float64
//     vectors, compiled for SSE2 and, chosen at run time, for AVX2 + FMA):
//       channels contiguous (NHWC, NLC, channels_last): vectors over channels, read in place;
//       positions contiguous (NCHW), per element: integer translations with long runs go along
//         their runs of positions (vectors over positions, read in place); so do bilinear maps
//         whose runs are long: a bilinear run keeps its first position's weights (bitwise) and
//         its taps advance with x (fractional translations), so it is four shifted rows, and the
//         re-aligned identity plane is interpolated once per (element, image, channel) and
//         cached (image b's eq plane is image b - 1's chance plane; tasks go images fastest);
//         the next element's plane is prefetched (planes up to 8 KB). Rotations, flips, other
//         bilinear maps and short runs go through tiles of 16 channels transposed (4 x 4 blocks
//         in registers) into a [position][channel] scratch (gathers become row reads), grids up
//         to 4096 positions; small tiles of the next element are prefetched.
//     With AVX-512 (a third copy, run-time choice) the channels loops use 8 x float64 vectors and
//     all loops get 32 vector registers.
//   - Threads: equifast::parallel_for = at::parallel_for when compiled with OpenMP (recommended:
//     -fopenmp shares torch's OpenMP team), else torch's inter-op pool (parallel.h).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "equifast/affine.h"
#include "equifast/checks.h"
#include "equifast/moments.h"
#include "equifast/parallel.h"
#include "equifast/poison.h"
#include "equifast/stats_args.h"
#include "cpu_isa.h"

namespace equifast {
namespace {

constexpr int kComparisons = 3;              // eq, inv, chance (the first axis of the output)
constexpr int kFields = 2 + 3 * kComparisons;  // sum a, sum a^2, (sum b, sum b^2, sum ab) x 3
// Channels per task when channels are contiguous (at most; see channels_per_task), and positions
// per pass of the channels loops. Each pass reloads the running sums of the task's channels (11
// vectors per 8 channels, 34 KB for 384 channels: L1 or L2). Tasks that cover whole rows of
// channels read the features as one stream, and longer passes amortize the reloads. Timed
// alternately in one process on a 2-core EPYC, caches flushed between calls: against 128
// channels x 16 positions, whole rows x 64 positions took 0.81x the time for NHWC 56x56x256 and
// 0.84-0.92x for ViT NLC 197x384; prefetching the next pass's rows of a (ChannelsWorker) then
// took another 0.87-0.92x / 0.82-0.84x with passes of 24-32 positions (the prefetched rows still
// in L1 when used), and did nothing with 64. The transposed loop nest (16 channels, tiles in
// cache) was unchanged within 2% by either and prefetches nothing.
constexpr int kTile = 384;
constexpr int kMinTile = 64;                 // narrowest task, when tasks are too few for threads
constexpr int kTransposeTile = 16;           // channels per task of the transposed loop nest
constexpr int64_t kTransposeMaxPositions = 4096;  // larger grids: the positions loop nest
constexpr int kChunkPositions = 32;
constexpr int64_t kMaxRun = 1024;            // longest run of positions

// A run of valid positions along x in one row of the grid.
struct Segment {
  int64_t out;       // offset of its first position in an image: y * stride_y + x * stride_x
  int64_t src;       // exact maps: offset of that position's source in the identity image
  int64_t src_step;  // exact maps: source offset step from one position of the run to the next
  int64_t len;       // positions in the run
  int64_t first;     // index of its first position among the valid ones (taps, weights)
};

// How element k reads the identity image; shared by all images and channels. Offsets are in the
// strides the plan was made for (those of feats, or of a transposed scratch).
struct ElementPlan {
  bool skip = false;  // non-integer map with subpixel 'skip': all statistics stay 0
  bool exact = true;  // integer map: one tap per position
  int64_t count = 0;  // valid positions
  std::vector<Segment> segments;
  std::vector<int64_t> out_offsets;  // every valid position's offset (channels loops)
  std::vector<int64_t> src_offsets;  // ... and its exact source's
  std::vector<int64_t> taps;         // bilinear: 4 source offsets per valid position
  std::vector<double> weights;       // bilinear: their 4 weights (reference order)
};



ElementPlan make_plan(const SourceMap& map, int64_t grid_h, int64_t grid_w, int64_t sy,
                      int64_t sx, bool skip_subpixel, bool flat) {
  ElementPlan plan;
  plan.exact = map.exact != 0;
  if (!plan.exact && skip_subpixel) {
    plan.skip = true;
    return plan;
  }
  const SampleGrid grid = feature_grid(grid_h, grid_w, map.wrap != 0);
  for (int64_t y = 0; y < grid_h; ++y) {
    bool open = false;  // whether the previous x is valid (its run can grow)
    int64_t prev_src = 0;
    for (int64_t x = 0; x < grid_w; ++x) {
      int64_t src = 0;
      bool inside;
      if (plan.exact) {
        int64_t ix, iy;
        apply_exact_map(map, x, y, ix, iy);
        const ExactTap tap = exact_tap(ix, iy, grid);
        inside = tap.inside && inside_discs(map, static_cast<double>(x), static_cast<double>(y),
                                            static_cast<double>(ix), static_cast<double>(iy));
        src = tap.iy * sy + tap.ix * sx;
      } else {
        double fx, fy;
        apply_map(map, static_cast<double>(x), static_cast<double>(y), fx, fy);
        const BilinearTaps t = bilinear_taps(fx, fy, grid);
        inside = t.inside &&
                 inside_discs(map, static_cast<double>(x), static_cast<double>(y), fx, fy);
        if (inside) {
          plan.taps.insert(plan.taps.end(), {t.y0 * sy + t.x0 * sx, t.y0 * sy + t.x1 * sx,
                                             t.y1 * sy + t.x0 * sx, t.y1 * sy + t.x1 * sx});
          plan.weights.insert(plan.weights.end(), {t.w00, t.w01, t.w10, t.w11});
        }
      }
      if (inside) {
        // Extend the open run; for exact maps only while the source keeps a constant step
        // (wrapping around breaks it).
        Segment* last = open ? &plan.segments.back() : nullptr;
        bool extend = last != nullptr && last->len < kMaxRun &&
                      (!plan.exact || last->len == 1 || src - prev_src == last->src_step);
        if (extend && !plan.exact) {
          // Bilinear runs keep their first position's weights (bitwise) and taps advanced by
          // sx per position, so that a run is four strided rows (read in place, vectorized).
          const int64_t* t0 = plan.taps.data() + 4 * last->first;
          const int64_t* t1 = plan.taps.data() + 4 * plan.count;
          const double* w0 = plan.weights.data() + 4 * last->first;
          const double* w1 = plan.weights.data() + 4 * plan.count;
          for (int j = 0; j < 4; ++j) {
            extend = extend && t1[j] == t0[j] + last->len * sx &&
                     std::memcmp(&w1[j], &w0[j], sizeof(double)) == 0;
          }
        }
        if (extend) {
          if (plan.exact && last->len == 1) last->src_step = src - prev_src;
          ++last->len;
        } else {
          plan.segments.push_back(Segment{y * sy + x * sx, src, 0, 1, plan.count});
        }
        ++plan.count;
      }
      open = inside;
      prev_src = src;
    }
  }
  if (flat) {  // the valid positions one by one, for the loops that go position by position
    plan.out_offsets.reserve(plan.count);
    plan.src_offsets.reserve(plan.count);
    for (const Segment& seg : plan.segments) {
      for (int64_t p = 0; p < seg.len; ++p) {
        plan.out_offsets.push_back(seg.out + p * sx);
        plan.src_offsets.push_back(seg.src + p * seg.src_step);
      }
    }
  }
  return plan;
}

// The four-tap bilinear value, summed in the reference's order, in float64 and rounded once: a
// map that is constant in exact arithmetic (a constant channel, or a 2 x 2 grid shifted by half a
// pixel with wrapping) then stays exactly constant, so that its spread is exactly 0 (the scores
// call such a comparison undefined) instead of float32 rounding noise.
template <typename acc_t, typename scalar_t>
inline acc_t bilinear_value(const scalar_t* image, const int64_t* taps, const double* weights) {
  double value = static_cast<double>(image[taps[0]]) * weights[0];
  value += static_cast<double>(image[taps[1]]) * weights[1];
  value += static_cast<double>(image[taps[2]]) * weights[2];
  value += static_cast<double>(image[taps[3]]) * weights[3];
  return static_cast<acc_t>(value);
}

// ---------------------------------------------------------------------------------------------
// SIMD vectors through the GCC/Clang vector extensions: the same source compiles to SSE2 (a
// 32-byte vector is two registers) for the baseline ISA and to AVX2 + FMA in the
// target("avx2,fma") copies below. Unaligned loads go through the *_u types (alignment of the
// element, may_alias).
typedef float f32x4 __attribute__((vector_size(16)));
typedef float f32x4_u __attribute__((vector_size(16), aligned(4), may_alias));
typedef double f64x2 __attribute__((vector_size(16)));
typedef double f64x2_u __attribute__((vector_size(16), aligned(8), may_alias));
typedef double f64x4 __attribute__((vector_size(32)));
typedef double f64x4_u __attribute__((vector_size(32), aligned(8), may_alias));
typedef double f64x8 __attribute__((vector_size(64)));
typedef double f64x8_u __attribute__((vector_size(64), aligned(8), may_alias));

// Broadcast without a function that returns a vector by value (whose ABI would depend on the ISA
// the function is compiled for).
#define EQUIFAST_BROADCAST(vec_t, value) (vec_t{} + (value))

// W (4 or 8) float32 or float64 values into a float64 vector of W lanes: the sums are float64
// (see the design note at the top). Through a reference, not a return value, so that no vector
// crosses a call boundary whose ABI would depend on the ISA (they are inlined anyway). 8 lanes
// with AVX-512, whose 32 registers hold the 8-lane sums.
//
// float32 values are widened through an element-wise initializer: GCC 12 lowers
// __builtin_convertvector of a float32 vector to a wider float64 one as two half conversions and
// an insert (8 lanes: an extract, two conversions and an insert), where the initializer becomes
// one vcvtps2pd from memory in the AVX2 and AVX-512 copies (two cvtps2pd with SSE2). That is a
// third fewer instructions in the channels loops (about 10% on one thread).
template <typename T, int W>
struct LoadV;
template <>
struct LoadV<float, 4> {
  typedef f64x4 vec;
  typedef f64x4_u vec_u;
  static inline __attribute__((always_inline)) void load(const float* p, vec& out) {
    out = vec{p[0], p[1], p[2], p[3]};
  }
};
template <>
struct LoadV<double, 4> {
  typedef f64x4 vec;
  typedef f64x4_u vec_u;
  static inline __attribute__((always_inline)) void load(const double* pointer, vec& out) {
    out = *reinterpret_cast<const f64x4_u*>(pointer);
  }
};
template <>
struct LoadV<float, 8> {
  typedef f64x8 vec;
  typedef f64x8_u vec_u;
  static inline __attribute__((always_inline)) void load(const float* p, vec& out) {
    out = vec{p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]};
  }
};
template <>
struct LoadV<double, 8> {
  typedef f64x8 vec;
  typedef f64x8_u vec_u;
  static inline __attribute__((always_inline)) void load(const double* pointer, vec& out) {
    out = *reinterpret_cast<const f64x8_u*>(pointer);
  }
};

// Where the statistics go: (3, K, B, C, 6) float64, and which comparisons are computed, in slot
// order (eq, then inv, then chance).
struct StatsOut {
  double* data;
  int64_t elements, batch, channels;
  int which[kComparisons];
  int slots;

  StatsOut(double* data_, int64_t elements_, int64_t batch_, int64_t channels_, bool with_inv,
           bool with_chance)
      : data(data_), elements(elements_), batch(batch_), channels(channels_), slots(0) {
    which[slots++] = 0;
    if (with_inv) which[slots++] = 1;
    if (with_chance) which[slots++] = 2;
  }

  double* at(int comparison, int64_t k, int64_t b, int64_t c) const {
    return data + (((comparison * elements + k) * batch + b) * channels + c) * 6;
  }

  // The six statistics of every computed comparison of (k, b, c) from its double sums
  // (sums[f * field_stride], fields as kFields).
  template <int NB>
  void store(int64_t k, int64_t b, int64_t c, double count, double shift_a, const double* shift_b,
             const double* sums, int64_t field_stride) const {
    for (int i = 0; i < NB; ++i) {
      const PairMoments<double> moments = moments_from_shifted_sums<double>(
          count, shift_a, shift_b[i], sums[0], sums[(2 + 3 * i) * field_stride],
          sums[field_stride], sums[(3 + 3 * i) * field_stride], sums[(4 + 3 * i) * field_stride]);
      moments.store(at(which[i], k, b, c));
    }
  }
};

// Everything the loop nests share.
template <typename scalar_t>
struct StatsJob {
  // The identity block (the first images of feats, or `reference`) and the element blocks, each
  // at (image 0, channel 0, y 0, x 0); both share the view's channel and position strides.
  const scalar_t* identity;
  int64_t identity_stride_n;
  const scalar_t* blocks;  // element 0's block; element k's starts k * batch images later
  FeatureView view;
  StatsOut out;
  const std::vector<ElementPlan>* plans;  // in the strides of feats
  const std::vector<ElementPlan>* transposed_plans;  // in the strides of a transposed tile
  int64_t tile;  // channels per task of the channels loop nest (channels_per_task)

  const scalar_t* identity_image(int64_t b, int64_t c) const {
    return identity + b * identity_stride_n + c * view.stride_c;
  }
  const scalar_t* element_image(int64_t k, int64_t b, int64_t c) const {
    return blocks + (k * out.batch + b) * view.stride_n + c * view.stride_c;
  }
};

// Channels per task of the channels loop nest: whole rows up to kTile channels, in tiles of
// equal width (a multiple of 8) when a row is wider; narrower (down to kMinTile) while the batch
// would give fewer than two tasks per thread, so that small batches still use every thread.
int64_t channels_per_task(int64_t channels, int64_t batch, int64_t threads) {
  const auto round_up = [](int64_t n, int64_t m) { return (n + m - 1) / m * m; };
  int64_t tiles = (channels + kTile - 1) / kTile;
  int64_t width = std::min<int64_t>(round_up((channels + tiles - 1) / tiles, 8), kTile);
  while (width > kMinTile && batch * ((channels + width - 1) / width) < 2 * threads) {
    width = std::max<int64_t>(kMinTile, round_up(width / 2, 8));
  }
  return width;
}

// Copies `width` channels (stride sc) at `src` into `dst` as acc_t; the unit-stride loop
// vectorizes.
template <typename scalar_t, typename acc_t>
inline void copy_channels(acc_t* dst, const scalar_t* src, int64_t width, int64_t sc) {
  if (sc == 1) {
    for (int64_t t = 0; t < width; ++t) dst[t] = static_cast<acc_t>(src[t]);
  } else {
    for (int64_t t = 0; t < width; ++t) dst[t] = static_cast<acc_t>(src[t * sc]);
  }
}

// Bilinear value of `width` channels (stride sc) from 4 taps of `image` (float64, as
// bilinear_value); float32 rows of contiguous channels go 4 channels per vector.
template <typename scalar_t, typename acc_t>
inline void bilinear_channels(acc_t* dst, const scalar_t* image, const int64_t* taps,
                              const double* weights, int64_t width, int64_t sc) {
  const scalar_t* p0 = image + taps[0];
  const scalar_t* p1 = image + taps[1];
  const scalar_t* p2 = image + taps[2];
  const scalar_t* p3 = image + taps[3];
  int64_t t = 0;
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
    if (sc == 1) {
      for (; t + 4 <= width; t += 4) {
        f64x4 tap;  // widened as in LoadV
        LoadV<float, 4>::load(p0 + t, tap);
        f64x4 value = tap * weights[0];
        LoadV<float, 4>::load(p1 + t, tap);
        value += tap * weights[1];
        LoadV<float, 4>::load(p2 + t, tap);
        value += tap * weights[2];
        LoadV<float, 4>::load(p3 + t, tap);
        value += tap * weights[3];
        *reinterpret_cast<f32x4_u*>(dst + t) = __builtin_convertvector(value, f32x4);
      }
    }
  }
  for (; t < width; ++t) {
    double value = static_cast<double>(p0[t * sc]) * weights[0];
    value += static_cast<double>(p1[t * sc]) * weights[1];
    value += static_cast<double>(p2[t * sc]) * weights[2];
    value += static_cast<double>(p3[t * sc]) * weights[3];
    dst[t] = static_cast<acc_t>(value);
  }
}

// The re-aligned planes (bilinear values of every valid position, in plan order) of one channel
// of identity images, a few per element, tagged by (image, channel): the eq plane of image b is
// the chance plane of image b - 1, and image 0's serves the last image's chance.
template <typename scalar_t, typename acc_t>
class PlaneCache {
  static constexpr int kSlots = 3;

 public:
  explicit PlaneCache(int64_t elements) : slots_(elements) {}

  const acc_t* get(int64_t k, const ElementPlan& plan, const scalar_t* source, int64_t image,
                   int64_t channel, int64_t sx) {
    Slots& s = slots_[k];
    for (int j = 0; j < kSlots; ++j) {
      if (s.image[j] == image && s.channel[j] == channel) {
        s.used[j] = ++clock_;
        return s.data.data() + j * plan.count;
      }
    }
    if (s.data.empty()) s.data.resize(kSlots * plan.count);
    int victim = 0;  // least recently used, but keep image 0 (the last image's chance)
    for (int j = 1; j < kSlots; ++j) {
      const bool keep_v = s.image[victim] == 0 && s.channel[victim] == channel;
      const bool keep_j = s.image[j] == 0 && s.channel[j] == channel;
      if (keep_v != keep_j ? keep_v : s.used[j] < s.used[victim]) victim = j;
    }
    acc_t* plane = s.data.data() + victim * plan.count;
    for (const Segment& seg : plan.segments) {  // taps advance by sx along a run (make_plan)
      bilinear_channels(plane + seg.first, source, plan.taps.data() + 4 * seg.first,
                        plan.weights.data() + 4 * seg.first, seg.len, sx);
    }
    s.image[victim] = image;
    s.channel[victim] = channel;
    s.used[victim] = ++clock_;
    return plane;
  }

 private:
  struct Slots {
    std::vector<acc_t> data;
    int64_t image[kSlots] = {-1, -1, -1};
    int64_t channel[kSlots] = {-1, -1, -1};
    int64_t used[kSlots] = {0, 0, 0};
  };
  std::vector<Slots> slots_;
  int64_t clock_ = 0;
};

// ---------------------------------------------------------------------------------------------
// Positions contiguous (NCHW): tasks [begin, end) of (image b, channel c). Each run of valid
// positions is read in place when it is contiguous on both sides (integer translations of float
// features), and packed into a small scratch otherwise (gathers, bilinear taps, half types).
template <int NB, typename scalar_t, typename acc_t>
inline void positions_range(const StatsJob<scalar_t>& job, int64_t begin, int64_t end) {
  typedef f64x4 vec_t;  // float64 sums, 4 positions per vector (two SSE2 registers or one AVX2)
  constexpr int W = 4;
  const FeatureView& v = job.view;
  const int64_t channels = v.channels, batch = job.out.batch, sx = v.stride_x;
  const int* which = job.out.which;
  std::vector<acc_t> scratch(4 * kMaxRun);
  acc_t* pack_a = scratch.data();
  acc_t* pack_b[3] = {pack_a + kMaxRun, pack_a + 2 * kMaxRun, pack_a + 3 * kMaxRun};
  PlaneCache<scalar_t, acc_t> cache(job.out.elements);
  const int64_t plane_bytes = static_cast<int64_t>(v.grid_h * v.stride_y * sizeof(scalar_t));
  const int64_t prefetch_bytes =
      v.stride_x == 1 && v.stride_y == v.grid_w && plane_bytes <= 8192 ? plane_bytes : 0;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task % batch, c = task / batch;  // images fastest: planes are reused
    const scalar_t* id_b = job.identity_image(b, c);
    const scalar_t* id_next = job.identity_image((b + 1) % batch, c);
    for (int64_t k = 0; k < job.out.elements; ++k) {
      const ElementPlan& plan = (*job.plans)[k];
      if (plan.skip || plan.count == 0) continue;  // statistics stay 0
      const scalar_t* image = job.element_image(k, b, c);
      if (prefetch_bytes > 0) {
        // The next element's plane (or the next task's first), elsewhere in memory, is on its
        // way while this one is summed.
        const scalar_t* ahead = nullptr;
        if (k + 1 < job.out.elements) {
          ahead = image + batch * v.stride_n;
        } else if (task + 1 < end) {
          ahead = job.element_image(0, (task + 1) % batch, (task + 1) / batch);
        }
        if (ahead != nullptr) {
          const char* bytes = reinterpret_cast<const char*>(ahead);
          for (int64_t o = 0; o < prefetch_bytes; o += 64) __builtin_prefetch(bytes + o);
        }
      }
      // The sources of slot i: eq (re-aligned b), inv (b in place), chance (re-aligned b + 1).
      const scalar_t* sources[3];
      bool realigned[3];
      for (int i = 0; i < NB; ++i) {
        const int comparison = which[i];
        sources[i] = comparison == 2 ? id_next : id_b;
        realigned[i] = comparison != 1;
      }
      // Shifts: the values at the first valid position.
      const Segment& first = plan.segments.front();
      const double shift_a = static_cast<double>(static_cast<acc_t>(image[first.out]));
      double shift_b[NB];
      for (int i = 0; i < NB; ++i) {
        if (!realigned[i]) {
          shift_b[i] = static_cast<double>(static_cast<acc_t>(sources[i][first.out]));
        } else if (plan.exact) {
          shift_b[i] = static_cast<double>(static_cast<acc_t>(sources[i][first.src]));
        } else {
          shift_b[i] = static_cast<double>(
              bilinear_value<acc_t>(sources[i], plan.taps.data(), plan.weights.data()));
        }
      }
      // Bilinear maps: the re-aligned identity planes (eq of image b is chance of b - 1).
      const acc_t* planes[3] = {nullptr, nullptr, nullptr};
      if (!plan.exact) {
        for (int i = 0; i < NB; ++i) {
          if (realigned[i]) {
            const int64_t img = which[i] == 2 ? (b + 1) % batch : b;
            planes[i] = cache.get(k, plan, sources[i], img, c, sx);
          }
        }
      }
      vec_t sum_a{}, sum_aa{}, sum_b[NB], sum_bb[NB], sum_ab[NB];
      double sums[kFields] = {};  // the positions past the last full vector of each run
      for (int i = 0; i < NB; ++i) sum_b[i] = sum_bb[i] = sum_ab[i] = vec_t{};
      const vec_t shift_a_vec = EQUIFAST_BROADCAST(vec_t, shift_a);
      vec_t shift_b_vec[NB];
      for (int i = 0; i < NB; ++i) shift_b_vec[i] = EQUIFAST_BROADCAST(vec_t, shift_b[i]);
      for (const Segment& seg : plan.segments) {
        const int64_t len = seg.len;
        // Pointers to the run's a and b values: in place, or packed into the scratch.
        const acc_t* run_a;
        const acc_t* run_b[3];
        // Read in place where a row of values is contiguous (float values, unit steps);
        // bilinear rows come from the element's re-aligned planes, others are packed.
        const bool direct = std::is_same_v<scalar_t, acc_t> && sx == 1;
        if (direct) {
          run_a = reinterpret_cast<const acc_t*>(image + seg.out);
        } else {
          for (int64_t p = 0; p < len; ++p) pack_a[p] = static_cast<acc_t>(image[seg.out + p * sx]);
          run_a = pack_a;
        }
        for (int i = 0; i < NB; ++i) {
          const scalar_t* source = sources[i];
          acc_t* dst = pack_b[i];
          if (!realigned[i]) {
            if (direct) {
              run_b[i] = reinterpret_cast<const acc_t*>(source + seg.out);
              continue;
            }
            for (int64_t p = 0; p < len; ++p) {
              dst[p] = static_cast<acc_t>(source[seg.out + p * sx]);
            }
          } else if (plan.exact) {
            const int64_t step = seg.src_step;
            if (direct && (step == 1 || len == 1)) {
              run_b[i] = reinterpret_cast<const acc_t*>(source + seg.src);
              continue;
            }
            for (int64_t p = 0; p < len; ++p) {
              dst[p] = static_cast<acc_t>(source[seg.src + p * step]);
            }
          } else {
            run_b[i] = planes[i] + seg.first;
            continue;
          }
          run_b[i] = dst;
        }
        // The single-pass shifted sums: W positions per step, then a scalar tail.
        int64_t p = 0;
        for (; p + W <= len; p += W) {
          vec_t a, bv;
          LoadV<acc_t, 4>::load(run_a + p, a);
          a -= shift_a_vec;
          sum_a += a;
          sum_aa += a * a;
          for (int i = 0; i < NB; ++i) {
            LoadV<acc_t, 4>::load(run_b[i] + p, bv);
            bv -= shift_b_vec[i];
            sum_b[i] += bv;
            sum_bb[i] += bv * bv;
            sum_ab[i] += a * bv;
          }
        }
        for (; p < len; ++p) {
          const double a = static_cast<double>(run_a[p]) - shift_a;
          sums[0] += a;
          sums[1] += a * a;
          for (int i = 0; i < NB; ++i) {
            const double bv = static_cast<double>(run_b[i][p]) - shift_b[i];
            sums[2 + 3 * i] += bv;
            sums[3 + 3 * i] += bv * bv;
            sums[4 + 3 * i] += a * bv;
          }
        }
      }
      for (int l = 0; l < W; ++l) {
        sums[0] += sum_a[l];
        sums[1] += sum_aa[l];
        for (int i = 0; i < NB; ++i) {
          sums[2 + 3 * i] += sum_b[i][l];
          sums[3 + 3 * i] += sum_bb[i][l];
          sums[4 + 3 * i] += sum_ab[i][l];
        }
      }
      job.out.template store<NB>(k, b, c, static_cast<double>(plan.count), shift_a, shift_b,
                                 sums, 1);
    }
  }
}

// The work of one element on one tile of channels whose values sit at channel stride `sc`
// (channels contiguous, or a transposed tile). Positions go in chunks of kChunkPositions; for
// each chunk, each group of 4 channels loads its float64 sums (kept in L1 across positions) into
// registers, adds the chunk and stores them back. Rows are read in place (float values, integer
// maps, unit channel stride) or packed [position][channel] into a scratch (half types, bilinear
// taps, strided channels). acc_t: the type values are read and rounded in.
template <int NB, typename scalar_t, typename acc_t, int W>
class ChannelsWorker {
  // float64 sums, W channels per vector (4: two SSE2 registers or one AVX2; 8: one AVX-512)
  typedef typename LoadV<acc_t, W>::vec vec_t;
  typedef typename LoadV<acc_t, W>::vec_u vec_u;
  // Rows packed into the scratch (half types, bilinear taps, strided channels) go 16 positions
  // per pass, so that the packed block stays small.
  static constexpr int kPackedChunkPositions = 16;
  static constexpr int64_t kBlock = static_cast<int64_t>(kPackedChunkPositions) * kTile;
  static constexpr int64_t kShiftStride = kTile + 8;  // off a power of two: distinct L1 sets

 public:
  explicit ChannelsWorker(const StatsOut& out)
      : out_(out),
        sums_(kFields * kTile),
        values_(kTile),
        shifts_((1 + kComparisons) * kShiftStride) {}

  // Statistics of element k (plan) for image b and channels [c0, c0 + width): a's rows at
  // `image`, the identity rows at `id_b` and `id_next`. `readable` channels (>= width) may be
  // read at each row (the rest of a vector group is discarded). `prefetch`: a's rows come from
  // memory (not from a tile in cache), so prefetch them a pass ahead.
  void element(const ElementPlan& plan, const scalar_t* image, const scalar_t* id_b,
               const scalar_t* id_next, int64_t width, int64_t readable, int64_t sc, int64_t k,
               int64_t b, int64_t c0, bool prefetch) {
    const int64_t groups = (width + W - 1) / W;
    const scalar_t* sources[3];
    bool realigned[3];
    for (int i = 0; i < NB; ++i) {
      sources[i] = out_.which[i] == 2 ? id_next : id_b;
      realigned[i] = out_.which[i] != 1;
    }
    const bool in_place =
        std::is_same_v<scalar_t, acc_t> && sc == 1 && plan.exact && groups * W <= readable;
    // Shifts: the values at the first valid position (0 past the last channel).
    const int64_t lanes = groups * W;  // channels the vector groups touch
    // Shifts: the values at the first valid position (0 past the last channel), as float64.
    double* shift_a = shifts_.data();
    double* shift_b[3] = {shift_a + kShiftStride, shift_a + 2 * kShiftStride,
                          shift_a + 3 * kShiftStride};
    acc_t* values = values_.data();
    std::fill_n(values, lanes, acc_t(0));
    copy_channels(values, image + plan.out_offsets[0], width, sc);
    for (int64_t t = 0; t < lanes; ++t) shift_a[t] = static_cast<double>(values[t]);
    for (int i = 0; i < NB; ++i) {
      if (!realigned[i]) {
        copy_channels(values, sources[i] + plan.out_offsets[0], width, sc);
      } else if (plan.exact) {
        copy_channels(values, sources[i] + plan.src_offsets[0], width, sc);
      } else {
        bilinear_channels(values, sources[i], plan.taps.data(), plan.weights.data(), width, sc);
      }
      for (int64_t t = 0; t < lanes; ++t) shift_b[i][t] = static_cast<double>(values[t]);
    }
    // Sums interleaved by vector group, [group][field][lane]: one group's fields share a few
    // cache lines (a [field][channel] layout puts them 2 KB apart, on the same L1 sets).
    std::fill_n(sums_.data(), groups * kFields * W, 0.0);
    // The packed rows, `lanes` apart (allocated on first use: rows read in place need none).
    if (!in_place && scratch_.empty()) scratch_.assign(4 * kBlock, acc_t(0));
    for (int j = 0; j < kPackedChunkPositions; ++j) packed_offsets_[j] = j * lanes;
    acc_t* pack_a = in_place ? nullptr : scratch_.data();
    acc_t* pack_b[3] = {nullptr, nullptr, nullptr};
    if (!in_place) {
      for (int i = 0; i < 3; ++i) pack_b[i] = pack_a + (i + 1) * kBlock;
    }
    const int64_t chunk = in_place ? kChunkPositions : kPackedChunkPositions;
    for (int64_t j0 = 0; j0 < plan.count; j0 += chunk) {
      const int64_t n = std::min<int64_t>(chunk, plan.count - j0);
      const int64_t* out_offsets = plan.out_offsets.data() + j0;
      const int64_t* src_offsets = plan.src_offsets.data() + j0;
      // Rows of a read in place from memory: the next pass's rows are prefetched during this one,
      // a cache line per row and line of channels, so that they arrive a pass ahead.
      const int64_t prefetch_rows = prefetch && in_place && j0 + chunk < plan.count
                                        ? std::min<int64_t>(chunk, plan.count - j0 - chunk)
                                        : 0;
      const int64_t* prefetch_offsets = prefetch_rows > 0 ? out_offsets + chunk : nullptr;
      const acc_t* base_a;
      const int64_t* offsets_a;
      const acc_t* base_b[3];
      const int64_t* offsets_b[3];
      if (in_place) {
        base_a = reinterpret_cast<const acc_t*>(image);
        offsets_a = out_offsets;
        for (int i = 0; i < NB; ++i) {
          base_b[i] = reinterpret_cast<const acc_t*>(sources[i]);
          offsets_b[i] = realigned[i] ? src_offsets : out_offsets;
        }
      } else {
        for (int64_t j = 0; j < n; ++j) {
          copy_channels(pack_a + j * lanes, image + out_offsets[j], width, sc);
          for (int i = 0; i < NB; ++i) {
            acc_t* row = pack_b[i] + j * lanes;
            if (!realigned[i]) {
              copy_channels(row, sources[i] + out_offsets[j], width, sc);
            } else if (plan.exact) {
              copy_channels(row, sources[i] + src_offsets[j], width, sc);
            } else {
              bilinear_channels(row, sources[i], &plan.taps[4 * (j0 + j)],
                                &plan.weights[4 * (j0 + j)], width, sc);
            }
          }
        }
        base_a = pack_a;
        offsets_a = packed_offsets_;
        for (int i = 0; i < NB; ++i) {
          base_b[i] = pack_b[i];
          offsets_b[i] = packed_offsets_;
        }
      }
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t t0 = g * W;
        double* group_sums = sums_.data() + g * kFields * W;
        const vec_t ka = *reinterpret_cast<const vec_u*>(shift_a + t0);
        vec_t sum_a = *reinterpret_cast<const vec_u*>(group_sums);
        vec_t sum_aa = *reinterpret_cast<const vec_u*>(group_sums + W);
        vec_t kb[NB], sum_b[NB], sum_bb[NB], sum_ab[NB];
        for (int i = 0; i < NB; ++i) {
          kb[i] = *reinterpret_cast<const vec_u*>(shift_b[i] + t0);
          sum_b[i] = *reinterpret_cast<const vec_u*>(group_sums + (2 + 3 * i) * W);
          sum_bb[i] = *reinterpret_cast<const vec_u*>(group_sums + (3 + 3 * i) * W);
          sum_ab[i] = *reinterpret_cast<const vec_u*>(group_sums + (4 + 3 * i) * W);
        }
        const int64_t rows_ahead = (t0 * sizeof(acc_t)) % 64 == 0 ? prefetch_rows : 0;
        for (int64_t j = 0; j < n; ++j) {
          vec_t a, bv;
          if (j < rows_ahead) __builtin_prefetch(base_a + prefetch_offsets[j] + t0);
          LoadV<acc_t, W>::load(base_a + offsets_a[j] + t0, a);
          a -= ka;
          sum_a += a;
          sum_aa += a * a;
          for (int i = 0; i < NB; ++i) {
            LoadV<acc_t, W>::load(base_b[i] + offsets_b[i][j] + t0, bv);
            bv -= kb[i];
            sum_b[i] += bv;
            sum_bb[i] += bv * bv;
            sum_ab[i] += a * bv;
          }
        }
        *reinterpret_cast<vec_u*>(group_sums) = sum_a;
        *reinterpret_cast<vec_u*>(group_sums + W) = sum_aa;
        for (int i = 0; i < NB; ++i) {
          *reinterpret_cast<vec_u*>(group_sums + (2 + 3 * i) * W) = sum_b[i];
          *reinterpret_cast<vec_u*>(group_sums + (3 + 3 * i) * W) = sum_bb[i];
          *reinterpret_cast<vec_u*>(group_sums + (4 + 3 * i) * W) = sum_ab[i];
        }
      }
    }
    const double count = static_cast<double>(plan.count);
    for (int64_t t = 0; t < width; ++t) {
      double shifts_b[NB];
      for (int i = 0; i < NB; ++i) shifts_b[i] = shift_b[i][t];
      out_.template store<NB>(k, b, c0 + t, count, shift_a[t], shifts_b,
                              sums_.data() + (t / W) * kFields * W + t % W, W);
    }
  }

 private:
  const StatsOut& out_;
  std::vector<acc_t> scratch_;   // packed rows: a, then the b slots
  std::vector<double> sums_;     // [group][field][lane]
  std::vector<acc_t> values_;    // one row of channels
  std::vector<double> shifts_;   // [a, b slots][channel]
  int64_t packed_offsets_[kPackedChunkPositions];
};

// Channels contiguous (NHWC, NLC, channels_last NCHW): tasks [begin, end) of (image b, tile of
// job.tile channels: whole rows where they fit), so that the rows of a are read as one stream.
template <int NB, typename scalar_t, typename acc_t, int W>
inline void channels_range(const StatsJob<scalar_t>& job, int64_t begin, int64_t end) {
  const FeatureView& v = job.view;
  const int64_t batch = job.out.batch;
  const int64_t tiles = (v.channels + job.tile - 1) / job.tile;
  const int64_t sc = v.stride_c;
  ChannelsWorker<NB, scalar_t, acc_t, W> worker(job.out);
  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / tiles, c0 = (task % tiles) * job.tile;
    const int64_t width = std::min<int64_t>(job.tile, v.channels - c0);
    const scalar_t* id_b = job.identity_image(b, c0);
    const scalar_t* id_next = job.identity_image((b + 1) % batch, c0);
    for (int64_t k = 0; k < job.out.elements; ++k) {
      const ElementPlan& plan = (*job.plans)[k];
      if (plan.skip || plan.count == 0) continue;  // statistics stay 0
      const scalar_t* image = job.element_image(k, b, c0);
      worker.element(plan, image, id_b, id_next, width, width, sc, k, b, c0, true);
    }
  }
}

#if defined(__clang__)
#define EQUIFAST_SHUFFLE(a, b, i0, i1, i2, i3) __builtin_shufflevector(a, b, i0, i1, i2, i3)
#else
#define EQUIFAST_SHUFFLE(a, b, i0, i1, i2, i3) \
  __builtin_shuffle(a, b, (__attribute__((vector_size(16))) int){i0, i1, i2, i3})
#endif

// Copies channels [c0, c0 + width) of one image into a [position][kTransposeTile] tile, a block
// of positions at a time: each plane is read in runs (one stream per channel, in memory order)
// while the block of the tile being written (4 KB) stays in L1.
template <typename scalar_t, typename acc_t>
inline void transpose_tile(acc_t* dst, const scalar_t* image, int64_t width, const FeatureView& v) {
  constexpr int64_t kBlockPositions = 64;
  if (v.stride_x == 1 && v.stride_y == v.grid_w) {  // every plane is one run of positions
    const int64_t positions = v.grid_h * v.grid_w;
    for (int64_t p0 = 0; p0 < positions; p0 += kBlockPositions) {
      const int64_t p1 = std::min(positions, p0 + kBlockPositions);
      int64_t t = 0;
      if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
        // 4 channels x 4 positions at a time, transposed in registers.
        for (; t + 4 <= width; t += 4) {
          const float* r0 = image + t * v.stride_c;
          const float* r1 = r0 + v.stride_c;
          const float* r2 = r1 + v.stride_c;
          const float* r3 = r2 + v.stride_c;
          int64_t p = p0;
          for (; p + 4 <= p1; p += 4) {
            const f32x4 x0 = *reinterpret_cast<const f32x4_u*>(r0 + p);
            const f32x4 x1 = *reinterpret_cast<const f32x4_u*>(r1 + p);
            const f32x4 x2 = *reinterpret_cast<const f32x4_u*>(r2 + p);
            const f32x4 x3 = *reinterpret_cast<const f32x4_u*>(r3 + p);
            const f32x4 t0 = EQUIFAST_SHUFFLE(x0, x1, 0, 4, 1, 5);
            const f32x4 t1 = EQUIFAST_SHUFFLE(x0, x1, 2, 6, 3, 7);
            const f32x4 t2 = EQUIFAST_SHUFFLE(x2, x3, 0, 4, 1, 5);
            const f32x4 t3 = EQUIFAST_SHUFFLE(x2, x3, 2, 6, 3, 7);
            float* d = dst + p * kTransposeTile + t;
            *reinterpret_cast<f32x4_u*>(d) = EQUIFAST_SHUFFLE(t0, t2, 0, 1, 4, 5);
            *reinterpret_cast<f32x4_u*>(d + kTransposeTile) = EQUIFAST_SHUFFLE(t0, t2, 2, 3, 6, 7);
            *reinterpret_cast<f32x4_u*>(d + 2 * kTransposeTile) =
                EQUIFAST_SHUFFLE(t1, t3, 0, 1, 4, 5);
            *reinterpret_cast<f32x4_u*>(d + 3 * kTransposeTile) =
                EQUIFAST_SHUFFLE(t1, t3, 2, 3, 6, 7);
          }
          for (; p < p1; ++p) {
            float* d = dst + p * kTransposeTile + t;
            d[0] = r0[p];
            d[1] = r1[p];
            d[2] = r2[p];
            d[3] = r3[p];
          }
        }
      }
      for (; t < width; ++t) {
        const scalar_t* plane = image + t * v.stride_c;
        for (int64_t p = p0; p < p1; ++p) {
          dst[p * kTransposeTile + t] = static_cast<acc_t>(plane[p]);
        }
      }
    }
    return;
  }
  for (int64_t y = 0; y < v.grid_h; ++y) {  // one grid row (of every channel) at a time
    acc_t* dst_row = dst + y * v.grid_w * kTransposeTile;
    for (int64_t t = 0; t < width; ++t) {
      const scalar_t* src_row = image + t * v.stride_c + y * v.stride_y;
      for (int64_t x = 0; x < v.grid_w; ++x) {
        dst_row[x * kTransposeTile + t] = static_cast<acc_t>(src_row[x * v.stride_x]);
      }
    }
  }
}

// Positions contiguous (NCHW) with grids up to kTransposeMaxPositions: tasks [begin, end) of
// (image b, tile of kTransposeTile channels). The identity tiles of b and b + 1 are transposed
// once per task, each element's tile once per element; the channels loops then read rows of 16
// contiguous channels, wherever the map sends them (a rotation's gathers become row reads).
template <int NB, typename scalar_t, typename acc_t, int W>
inline void transposed_range(const StatsJob<scalar_t>& job, int64_t begin, int64_t end) {
  const FeatureView& v = job.view;
  const int64_t batch = job.out.batch;
  const int64_t tiles = (v.channels + kTransposeTile - 1) / kTransposeTile;
  const int64_t tile_size = v.grid_h * v.grid_w * kTransposeTile;
  // Zeros past the last channel of a partial tile keep the discarded lanes finite.
  std::vector<acc_t> tiles_data(3 * tile_size, acc_t(0));
  acc_t* tile_a = tiles_data.data();
  acc_t* tile_b = tile_a + tile_size;
  acc_t* tile_next = tile_b + tile_size;
  ChannelsWorker<NB, acc_t, acc_t, W> worker(job.out);
  const bool dense = v.stride_x == 1 && v.stride_y == v.grid_w &&
                     v.stride_c == v.grid_h * v.grid_w && v.channels % kTransposeTile == 0;
  const int64_t block_bytes =
      static_cast<int64_t>(kTransposeTile * v.stride_c * sizeof(scalar_t));
  const int64_t prefetch_bytes = dense && block_bytes <= 16384 ? block_bytes : 0;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / tiles, c0 = (task % tiles) * kTransposeTile;
    const int64_t width = std::min<int64_t>(kTransposeTile, v.channels - c0);
    const int64_t next = (b + 1) % batch;
    transpose_tile(tile_b, job.identity_image(b, c0), width, v);
    if (next != b) {
      transpose_tile(tile_next, job.identity_image(next, c0), width, v);
    }
    const acc_t* id_next = next != b ? tile_next : tile_b;
    for (int64_t k = 0; k < job.out.elements; ++k) {
      const ElementPlan& plan = (*job.transposed_plans)[k];
      if (plan.skip || plan.count == 0) continue;  // statistics stay 0
      if (prefetch_bytes > 0) {
        // Small dense tiles: the next element's (or the next task's first) block of a, which
        // sits elsewhere in memory, is on its way while this one is computed.
        const scalar_t* ahead =
            k + 1 < job.out.elements
                ? job.element_image(k + 1, b, c0)
                : (task + 1 < end ? job.element_image(0, (task + 1) / tiles,
                                                      ((task + 1) % tiles) * kTransposeTile)
                                  : nullptr);
        if (ahead != nullptr) {
          const char* bytes = reinterpret_cast<const char*>(ahead);
          for (int64_t o = 0; o < prefetch_bytes; o += 64) __builtin_prefetch(bytes + o);
        }
      }
      transpose_tile(tile_a, job.element_image(k, b, c0), width, v);
      worker.element(plan, tile_a, tile_b, id_next, width, kTransposeTile, 1, k, b, c0, false);
    }
  }
}

// The loop nests compiled twice: for the baseline x86-64 ISA (SSE2) and, chosen at run time, for
// AVX2 + FMA. `flatten` inlines the helpers into the AVX2
// copies so that they are compiled for AVX2 too (and a third copy for AVX-512: 32 registers,
// 8-lane channels loops). EQUIFAST_CPU_ISA=default disables AVX2, =avx2 disables AVX-512.
enum class LoopNest { kChannels, kTransposed, kPositions };

template <int NB, typename scalar_t, typename acc_t, int W = 4>
inline void run_range(LoopNest nest, const StatsJob<scalar_t>& job, int64_t begin, int64_t end) {
  switch (nest) {
    case LoopNest::kChannels:
      channels_range<NB, scalar_t, acc_t, W>(job, begin, end);
      break;
    case LoopNest::kTransposed:
      transposed_range<NB, scalar_t, acc_t, W>(job, begin, end);
      break;
    case LoopNest::kPositions:
      positions_range<NB, scalar_t, acc_t>(job, begin, end);
      break;
  }
}

#if EQUIFAST_HAVE_AVX2_PATH
template <int NB, typename scalar_t, typename acc_t>
EQUIFAST_TARGET_AVX2 void run_range_avx2(LoopNest nest, const StatsJob<scalar_t>& job,
                                         int64_t begin, int64_t end) {
  run_range<NB, scalar_t, acc_t>(nest, job, begin, end);
}

template <int NB, typename scalar_t, typename acc_t>
EQUIFAST_TARGET_AVX512 void run_range_avx512(LoopNest nest, const StatsJob<scalar_t>& job,
                                             int64_t begin, int64_t end) {
  run_range<NB, scalar_t, acc_t, 8>(nest, job, begin, end);
}
#endif

template <int NB, typename scalar_t, typename acc_t>
void run_stats_nb(const StatsJob<scalar_t>& job, LoopNest nest) {
  const FeatureView& v = job.view;
  const bool avx2 = use_avx2();
  const bool avx512 = use_avx512();
  int64_t tasks = job.out.batch * v.channels;
  if (nest == LoopNest::kChannels) {
    tasks = job.out.batch * ((v.channels + job.tile - 1) / job.tile);
  }
  if (nest == LoopNest::kTransposed) {
    tasks = job.out.batch * ((v.channels + kTransposeTile - 1) / kTransposeTile);
  }
  // Grain: about 64K values of a per chunk of tasks amortizes the scheduling.
  const int64_t values_per_task =
      std::max<int64_t>(1, job.out.elements * v.grid_h * v.grid_w * v.channels * job.out.batch /
                               std::max<int64_t>(1, tasks));
  const int64_t grain = std::max<int64_t>(1, 65536 / values_per_task);
  parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
#if EQUIFAST_HAVE_AVX2_PATH
    if (avx512) return run_range_avx512<NB, scalar_t, acc_t>(nest, job, begin, end);
    if (avx2) return run_range_avx2<NB, scalar_t, acc_t>(nest, job, begin, end);
#endif
    run_range<NB, scalar_t, acc_t>(nest, job, begin, end);
  });
  (void)avx2;
  (void)avx512;
}

at::Tensor equivariance_stats_cpu(const at::Tensor& feats, const at::Tensor& source_affines,
                                  c10::IntArrayRef wrap, int64_t batch, c10::string_view layout,
                                  int64_t grid_h, int64_t grid_w, int64_t prefix,
                                  c10::string_view subpixel, bool with_inv, bool with_chance,
                                  const std::optional<at::Tensor>& reference,
                                  std::optional<c10::ArrayRef<double>> disc) {
  const StatsProblem problem = check_stats_args(
      feats, source_affines, wrap, batch, std::string_view(layout.data(), layout.size()), grid_h,
      grid_w, prefix, std::string_view(subpixel.data(), subpixel.size()), reference, disc);
  check_device_cpu(feats, "feats");
  const FeatureView& view = problem.view;
  // Uninitialized: the loop nests write every (k, b, c) of the comparisons they compute, and only
  // the slabs nobody writes are zeroed below (for 2048 x 7 x 7 maps the statistics are a third of
  // the bytes of the features: zeroing all of them first cost 15% of the op).
  at::Tensor stats = at::empty({kComparisons, problem.elements, batch, view.channels, 6},
                               feats.options().dtype(at::kDouble));
  double* const stats_data = stats.data_ptr<double>();
  if (poison_outputs()) {
    std::fill_n(stats_data, stats.numel(), std::numeric_limits<double>::quiet_NaN());
  }
  if (problem.elements == 0 || view.channels == 0) return stats;
  // Channels the fastest axis (NHWC, NLC, channels_last): vectors over channels, for every
  // element. Positions the fastest axis (NCHW): elements that read contiguous runs of positions
  // (integer translations, long runs) go along their runs; the others (rotations, flips,
  // bilinear maps, short runs) go through transposed tiles when the grid is small enough.
  const bool channels_inner =
      view.channels > 1 && std::abs(view.stride_c) < std::abs(view.stride_x);
  const bool can_transpose =
      !channels_inner && view.channels > 1 && view.grid_h * view.grid_w <= kTransposeMaxPositions;
  std::vector<ElementPlan> plans(problem.elements);            // in the strides of feats
  std::vector<ElementPlan> transposed_plans(problem.elements);  // in the strides of a tile
  parallel_for(0, problem.elements, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      ElementPlan plan = make_plan(problem.maps[k], view.grid_h, view.grid_w, view.stride_y,
                                   view.stride_x, problem.skip_subpixel, channels_inner);
      bool along_runs = !can_transpose || plan.skip || plan.count == 0;
      if (!along_runs && !plan.exact && view.stride_x == 1) {
        along_runs = plan.count >= 8 * static_cast<int64_t>(plan.segments.size());
      }
      if (!along_runs && plan.exact && view.stride_x == 1) {
        // Contiguous on both sides, and runs long enough for vectors.
        bool contiguous = true;
        for (const Segment& seg : plan.segments) {
          contiguous = contiguous && (seg.src_step == 1 || seg.len == 1);
        }
        along_runs = contiguous && plan.count >= 16 * static_cast<int64_t>(plan.segments.size());
      }
      if (along_runs) {
        plans[k] = std::move(plan);
        transposed_plans[k].skip = true;
      } else {
        plans[k].skip = true;
        transposed_plans[k] =
            make_plan(problem.maps[k], view.grid_h, view.grid_w, view.grid_w * kTransposeTile,
                      kTransposeTile, problem.skip_subpixel, true);
      }
    }
  });
  bool any_runs = false, any_transposed = false;
  for (int64_t k = 0; k < problem.elements; ++k) {
    any_runs = any_runs || !plans[k].skip;
    any_transposed = any_transposed || !transposed_plans[k].skip;
  }
  // Zeros where no loop nest writes: comparisons not asked for, and elements without valid
  // positions (or bilinear ones under subpixel 'skip'). Filled here, on this thread: at::zeros
  // would start torch's OpenMP team, whose workers then spin for a while and compete with this
  // op's own threads.
  const int64_t slab = batch * view.channels * 6;  // one (comparison, element)
  for (int comparison = 0; comparison < kComparisons; ++comparison) {
    const bool asked = comparison == 0 || (comparison == 1 ? with_inv : with_chance);
    for (int64_t k = 0; k < problem.elements; ++k) {
      const bool computed = (!plans[k].skip && plans[k].count > 0) ||
                            (!transposed_plans[k].skip && transposed_plans[k].count > 0);
      if (!asked || !computed) {
        std::fill_n(stats_data + (comparison * problem.elements + k) * slab, slab, 0.0);
      }
    }
  }
  const StatsOut out(stats_data, problem.elements, batch, view.channels, with_inv, with_chance);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats.scalar_type(),
                                  "equivariance_stats_cpu", [&] {
    // float32 sums for float, half and bfloat16 features, float64 for float64 ones.
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* base = feats.const_data_ptr<scalar_t>() + view.offset;
    const scalar_t* identity =
        problem.separate_identity ? reference->const_data_ptr<scalar_t>() + view.offset : base;
    const StatsJob<scalar_t> job{identity, problem.identity_stride_n,
                                 base + problem.element_start * view.stride_n, view, out,
                                 &plans, &transposed_plans,
                                 channels_per_task(view.channels, batch, at::get_num_threads())};
    // Each element is computed by exactly one of the loop nests (the other skips it).
    std::vector<LoopNest> nests;
    if (channels_inner) {
      nests.push_back(LoopNest::kChannels);
    } else {
      if (any_runs) nests.push_back(LoopNest::kPositions);
      if (any_transposed) nests.push_back(LoopNest::kTransposed);
    }
    for (const LoopNest nest : nests) {
      if (out.slots == 1) {
        run_stats_nb<1, scalar_t, acc_t>(job, nest);
      } else if (out.slots == 2) {
        run_stats_nb<2, scalar_t, acc_t>(job, nest);
      } else {
        run_stats_nb<3, scalar_t, acc_t>(job, nest);
      }
    }
  });
  return stats;
}

}  // namespace
}  // namespace equifast

TORCH_LIBRARY_IMPL(equifast, CPU, m) {
  m.impl("equivariance_stats", &equifast::equivariance_stats_cpu);
}
