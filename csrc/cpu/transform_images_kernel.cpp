// transform_images on the CPU.
//
// Resamples B sources under E source maps into (E * B, 3, out_h, out_w) normalized images,
// element-major, in the model's dtype and memory format (contract: equifast/ops/_reference.py).
//
// Design: tasks are (element, block of kRowBlock output rows). A task first computes each row's
// sampling plan once (the shared affine.h rules: one tap for integer maps, four bilinear taps
// otherwise, weights already multiplied by the validity so that outside positions read the fill
// 0), then applies the plans to every image and channel. Integer rows whose ends are valid are a
// start and a step (no per-pixel plan); bilinear rows sum their four taps in float64 and round
// once, as the reference. uint8 rows that run backwards (flips, half turns) are reversed eight
// bytes at a time; the rows of a quarter turn walk down source columns, so a block of them is
// read as eight neighbouring columns at once and transposed in registers (gather_quarter_turn).
// uint8 sources normalize as the reference does, in float64, so integer maps reproduce it bit for
// bit: through a 256-entry table per channel, or in the AVX2 / AVX-512 copies of the loops
// (run-time choice, cpu_isa.h) through one float64 fma per value, vectorized, where that fma was
// checked to equal the table for every byte value. Bilinear uint8 rows whose taps pair up (x1
// the byte after x0: inside the source) read their pairs straight into vectors in the AVX-512
// copy: through 16-byte windows of a few source rows and a byte permutation (AVX-512 VBMI) where
// the rows are near horizontal, else with 32-bit gathers. Outputs beyond the last-level cache
// are written with non-temporal stores.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>  // sysconf
#endif

#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

#include "equifast/affine.h"
#include "equifast/checks.h"
#include "equifast/parallel.h"
#include "equifast/poison.h"
#include "equifast/transform_args.h"
#include "cpu_isa.h"

namespace equifast {
namespace {

// Source value -> normalized value. The reference computes in float64 and rounds once; so do the
// loops here, up to the rounding of the normalized value where it is used alone (integer maps).
template <typename scalar_t, typename acc_t>
struct Normalizer {
  // float64 v * scale + shift: (v / 255 - mean) / std for uint8, (v - mean) / std otherwise.
  double scale[3], shift[3];
  // uint8 only: the reference's (v / 255 - mean) / std, rounded to acc_t.
  acc_t table[3][256];
  // uint8 only: whether fma(v, scale, shift), rounded to acc_t, equals the table for all 256
  // values of every channel (checked here, exhaustively). Then the vector loops compute it (a
  // table lookup per pixel does not vectorize) and integer maps stay bit for bit the reference.
  bool arithmetic_is_exact = false;

  explicit Normalizer(const TransformProblem& problem) {
    constexpr bool kBytes = std::is_same_v<scalar_t, uint8_t>;
    bool exact = kBytes;
    for (int c = 0; c < 3; ++c) {
      const double mean = problem.normalize ? problem.mean[c] : 0.0;
      const double std = problem.normalize ? problem.std[c] : 1.0;
      scale[c] = kBytes ? 1.0 / (255.0 * std) : 1.0 / std;
      shift[c] = -mean / std;
      if constexpr (kBytes) {
        for (int v = 0; v < 256; ++v) {
          table[c][v] = static_cast<acc_t>((static_cast<double>(v) / 255.0 - mean) / std);
          const acc_t fused =
              static_cast<acc_t>(std::fma(static_cast<double>(v), scale[c], shift[c]));
          exact = exact && std::memcmp(&fused, &table[c][v], sizeof(acc_t)) == 0;
        }
      }
    }
    arithmetic_is_exact = exact;
  }
};

// One channel's normalization, as the loops use it.
//   operator(): the value rounded to acc_t (integer maps). uint8: the table, or with kFused (FMA
//     copies, arithmetic_is_exact) the checked fma; other sources: float64 arithmetic, rounded.
//   wide(): the value in float64, for bilinear sums (rounded once, at the end).
template <typename scalar_t, typename acc_t, bool kFused>
struct ChannelNormalizer {
  const acc_t* table;
  double scale, shift;

  ChannelNormalizer(const Normalizer<scalar_t, acc_t>& n, int c)
      : table(n.table[c]), scale(n.scale[c]), shift(n.shift[c]) {}

  inline acc_t operator()(scalar_t value) const {
    if constexpr (std::is_same_v<scalar_t, uint8_t> && !kFused) {
      return table[value];
    } else if constexpr (kFused) {
      return static_cast<acc_t>(std::fma(static_cast<double>(value), scale, shift));
    } else {
      return static_cast<acc_t>(wide(value));
    }
  }

  inline double wide(scalar_t value) const {
    return static_cast<double>(value) * scale + shift;
  }
};

#if EQUIFAST_HAVE_AVX2_PATH
// The windows of a paired32 row (RowPlan::build_windows), one group of eight pixels per
// iteration: each group's window start (window_first[g], its first top row and first column)
// and byte permutation (window_index, [group][32]), from the rows and columns of the pixels' top
// and bottom pairs ([top / bottom][x]). Returns the most source rows a group's window spans, or
// 0 where a pixel's pair is not inside its group's window (the row then gathers). A scalar loop
// here was a third of a row's planning, which is paid once per row for all images and channels.
EQUIFAST_TARGET_AVX512 inline int32_t plan_windows_avx512(const int32_t* rows,
                                                          const int32_t* columns, int64_t width,
                                                          int32_t row_stride,
                                                          int32_t* window_first,
                                                          uint8_t* window_index) {
  const __m256i zero = _mm256_setzero_si256(), last_x0 = _mm256_set1_epi32(14);
  const __m256i k257 = _mm256_set1_epi32(257), k256 = _mm256_set1_epi32(256);
  __m256i deepest = zero;  // bottom rows, as rows below each group's first
  __mmask8 misfit = 0;
  for (int64_t g = 0; g < width / 8; ++g) {
    const int32_t* top = rows + 8 * g;
    const int32_t* bottom = rows + width + 8 * g;
    const int32_t* column = columns + 8 * g;
    const int32_t first_row = std::min(top[0], top[7]);
    const int32_t first_column = std::min(column[0], column[7]);
    window_first[g] = first_row * row_stride + first_column;
    const __m256i x0 =
        _mm256_sub_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(column)),
                         _mm256_set1_epi32(first_column));
    const __m256i top_row = _mm256_sub_epi32(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(top)), _mm256_set1_epi32(first_row));
    const __m256i bottom_row =
        _mm256_sub_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bottom)),
                         _mm256_set1_epi32(first_row));
    // x1 is the byte after x0: at most byte 15 of a window.
    misfit |= _mm256_cmplt_epi32_mask(x0, zero) | _mm256_cmpgt_epi32_mask(x0, last_x0) |
              _mm256_cmplt_epi32_mask(top_row, zero) |
              _mm256_cmplt_epi32_mask(bottom_row, top_row);
    deepest = _mm256_max_epi32(deepest, bottom_row);
    // Window row r's bytes are 16r to 16r + 15. A pair's bytes b and b + 1 as one 16-bit lane,
    // b + 256 (b + 1) = 257 b + 256, narrowed (truncating) into pixel i's bytes 2i and 2i + 1.
    const __m256i top_byte = _mm256_add_epi32(_mm256_slli_epi32(top_row, 4), x0);
    const __m256i bottom_byte = _mm256_add_epi32(_mm256_slli_epi32(bottom_row, 4), x0);
    uint8_t* index = window_index + 32 * g;
    _mm_storeu_si128(
        reinterpret_cast<__m128i*>(index),
        _mm256_cvtepi32_epi16(_mm256_add_epi32(_mm256_mullo_epi32(top_byte, k257), k256)));
    _mm_storeu_si128(
        reinterpret_cast<__m128i*>(index + 16),
        _mm256_cvtepi32_epi16(_mm256_add_epi32(_mm256_mullo_epi32(bottom_byte, k257), k256)));
  }
  if (misfit != 0) return 0;
  alignas(32) int32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), deepest);
  return *std::max_element(lanes, lanes + 8) + 1;
}
#endif

// The sampling plan of one output row of one element (the shared affine.h rules: one tap for
// integer maps, four bilinear taps otherwise, weights already multiplied by the validity so that
// outside positions read the fill 0), computed once and applied to every image and channel.
enum class RowKind {
  kLine,      // integer map, all valid: source offset first + x * step (translations, quarter
              // turns and flips away from the edges). No per-pixel plan.
  kGather,    // integer map: offsets[x], weights[x] (0 or 1)
  kBilinear,  // offsets[t * width + x], weights[t * width + x] for the taps t = 00, 01, 10, 11
};

// The bilinear plan of output row y: offsets and weights [tap][x], as in RowPlan. A loop of its
// own, over copies of the map and grid and a restrict pointer per tap (parameters: GCC ignores
// restrict on local variables), so that the stores cannot alias the map, the grid or each
// other, and the loop vectorizes (with -fno-trapping-math, for floor()); the wrap test is out of
// the loop. When it did not vectorize, planning took a sixth of a rotation's time at 8 images.
template <bool kWrap>
inline void plan_bilinear_row(const SourceMap map, const SampleGrid grid, int64_t y, int64_t width,
                              int64_t base, int64_t src_sh, int64_t src_sw,
                              int64_t* __restrict o00, int64_t* __restrict o01,
                              int64_t* __restrict o10, int64_t* __restrict o11,
                              double* __restrict w00, double* __restrict w01,
                              double* __restrict w10, double* __restrict w11) {
  for (int64_t x = 0; x < width; ++x) {
    double sx, sy;
    apply_map(map, static_cast<double>(x), static_cast<double>(y), sx, sy);
    const BilinearTaps t =
        kWrap ? bilinear_taps(sx, sy, grid) : bilinear_taps_clamped(sx, sy, grid);
    const double inside = t.inside ? 1.0 : 0.0;
    o00[x] = base + t.y0 * src_sh + t.x0 * src_sw;
    o01[x] = base + t.y0 * src_sh + t.x1 * src_sw;
    o10[x] = base + t.y1 * src_sh + t.x0 * src_sw;
    o11[x] = base + t.y1 * src_sh + t.x1 * src_sw;
    w00[x] = t.w00 * inside;
    w01[x] = t.w01 * inside;
    w10[x] = t.w10 * inside;
    w11[x] = t.w11 * inside;
  }
}

// What the loops that apply a bilinear uint8 plan read besides its offsets and weights: nothing
// (the SSE2 and AVX2 copies), the int32 pair offsets (the AVX-512 copy's gathers), or those and
// the windows (with AVX-512 VBMI). A plan builds no more than its copy reads.
enum class VectorPairs { kNone, kGathers, kWindows };

struct RowPlan {
  RowKind kind = RowKind::kLine;
  int64_t first = 0, step = 0;   // kLine
  bool paired = false;           // kBilinear: every x1 tap is the byte after its x0 tap
  std::vector<int64_t> offsets;  // into one image plane of src
  std::vector<double> weights;
  // Paired rows whose offsets fit in int32: the x0 offsets of the top and bottom taps, [top /
  // bottom][x], for the AVX-512 loop's 32-bit gathers, and the largest of them (a gather reads
  // four bytes, two beyond the pair: the caller checks they are inside the source).
  bool paired32 = false;
  std::vector<int32_t> pair_offsets;
  int64_t last_pair_offset = 0;
  // Paired32 rows whose source lines are near horizontal (small rotations, shears), for the
  // AVX-512 VBMI loop: for each group of eight pixels the taps lie in at most kWindowRows
  // source rows and within 16 bytes of one column, so that the loop reads them as 16-byte
  // windows of those rows (from window_first, window_stride apart), one 64-byte vector, and picks
  // the eight top and eight bottom pairs out of it with one byte permutation, where gathers
  // cost a load per pair. window_index: the permutation, [group][32] (pixel i's top pair at bytes
  // 2i and 2i + 1, its bottom pair at 16 + 2i and 17 + 2i; window row r's bytes are 16r to
  // 16r + 15). window_rows is 0 where a group does not fit (the loop gathers), else the most any
  // group needs (every group loads as many); last_window_byte: one past the last byte read,
  // from the plane.
  static constexpr int kWindowRows = 4;
  int window_rows = 0;
  int64_t window_stride = 0;
  int64_t last_window_byte = 0;
  std::vector<int32_t> window_first;
  std::vector<uint8_t> window_index;
  std::vector<int32_t> pair_rows, pair_columns;  // build_windows' scratch, [top / bottom][x]

  explicit RowPlan(int64_t width)
      : offsets(4 * width),
        weights(4 * width),
        pair_offsets(2 * width),
        window_first(width / 8),
        window_index(32 * (width / 8)),
        pair_rows(2 * width),
        pair_columns(2 * width) {}

  // A pixel outside the source reads the fill: its four weights are 0, so its taps may be any
  // bytes of the plane. Its taps clamped at the source's edges are not a pair (x0 and x1 the same
  // column), and would leave the whole row to the scalar loop; the engine crops rotations with a
  // margin of 0, so that nearly every row of a rotation has such pixels. Each outside pixel takes
  // the taps of the nearest inside pixel (see below). Only
  // for uint8 sources: a float source may hold a NaN or an infinity, which a weight of 0 does
  // not cancel, and the reference reads the clamped taps.
  void borrow_outside_taps(int64_t width) {
    int64_t* o = offsets.data();
    const double* w = weights.data();
    // Along a row of an affine map the inside pixels (a weight not 0) are one run (the valid set
    // is a rectangle, which a line meets once), and the outside pixels are the row's two ends:
    // those before the run take its first pixel's taps, those after it its last's. The run's
    // ends are found from the row's ends (few pixels lie outside), and the pixels between them
    // checked in a loop without early exits, which vectorizes: planning is paid once per row,
    // and a scalar loop here took a seventh of it.
    const auto outside = [&](int64_t x) {
      return w[x] == 0.0 && w[width + x] == 0.0 && w[2 * width + x] == 0.0 &&
             w[3 * width + x] == 0.0;
    };
    int64_t first = 0;
    while (first < width && outside(first)) ++first;
    if (first == width) return;  // no inside pixel: no taps to borrow (the row reads the fill)
    int64_t last = width - 1;
    while (outside(last)) --last;
    const double *w00 = w, *w01 = w + width, *w10 = w + 2 * width, *w11 = w + 3 * width;
    int64_t gaps = 0;  // outside pixels within the run
    for (int64_t x = first; x <= last; ++x) {
      gaps += static_cast<int64_t>(w00[x] == 0.0) & static_cast<int64_t>(w01[x] == 0.0) &
              static_cast<int64_t>(w10[x] == 0.0) & static_cast<int64_t>(w11[x] == 0.0);
    }
    // Not one run (not seen from an affine map): nothing is borrowed, and the row stays unpaired
    // (the scalar loop; the output is the same either way, only the speed differs).
    if (gaps != 0) return;
    for (int t = 0; t < 4; ++t) {
      int64_t* tap = o + t * width;
      const int64_t before = tap[first], after = tap[last];
      for (int64_t x = 0; x < first; ++x) tap[x] = before;
      for (int64_t x = last + 1; x < width; ++x) tap[x] = after;
    }
  }

  // Fills the windows of a paired32 row (see above); leaves window_rows 0 where a group does not
  // fit. An offset is row * src_sh + column with the column below src_sh (src_sw is 1). Written
  // as loops over the row that vectorize: planning is paid once per row for every image and
  // channel, and a scalar version cost half as much as applying the row to 8 images.
  void build_windows(int64_t width, int64_t src_sh) {
    window_rows = 0;
    const int64_t groups = width / 8;
    if (groups == 0 || src_sh <= 0 || src_sh > std::numeric_limits<int32_t>::max()) return;
    // Rows and columns of the top and bottom pairs, [top / bottom][x]: the row from a float64
    // reciprocal (exact to one, the offsets being below 2^31) and one correction.
    const double reciprocal = 1.0 / static_cast<double>(src_sh);
    const int32_t sh = static_cast<int32_t>(src_sh);
    const int32_t* __restrict offset = pair_offsets.data();
    int32_t* __restrict row = pair_rows.data();
    int32_t* __restrict column = pair_columns.data();
    for (int64_t i = 0; i < 2 * width; ++i) {
      int32_t r = static_cast<int32_t>(static_cast<double>(offset[i]) * reciprocal);
      int32_t c = offset[i] - r * sh;
      r += static_cast<int32_t>(c >= sh) - static_cast<int32_t>(c < 0);
      row[i] = r;
      column[i] = offset[i] - r * sh;
    }
    int32_t moved = 0;  // pairs whose bottom taps are not below their top taps
    for (int64_t x = 0; x < width; ++x) {
      moved += static_cast<int32_t>(column[x] != column[width + x]);
    }
    if (moved != 0) return;
    // A group's window starts at its first top row and first column: along a row of an affine
    // map the taps' rows and columns are monotone, so those are at one end of the group. Each
    // pixel's bytes are then checked to lie inside the window all the same.
#if EQUIFAST_HAVE_AVX2_PATH
    const int32_t rows = plan_windows_avx512(row, column, width, sh, window_first.data(),
                                             window_index.data());
#else
    const int32_t rows = 0;  // (windows are read only with AVX-512 VBMI)
#endif
    if (rows == 0 || rows > kWindowRows) return;
    int64_t last = 0;
    for (int64_t g = 0; g < groups; ++g) {
      last = std::max(last, window_first[g] + (rows - 1) * src_sh + 16);
    }
    window_rows = rows;
    window_stride = src_sh;
    last_window_byte = last;
  }

  // An integer map moves the source by a fixed (dx, dy) per output pixel along a row. When both
  // ends of the row are valid, so is every pixel between them (the valid set is a rectangle), and
  // the offsets are a progression; under the circular protocol only if the row does not wrap.
  bool build_line(const TransformProblem& problem, const TransformElement& element, int64_t y,
                  int64_t base, int64_t src_sh, int64_t src_sw) {
    const SampleGrid& grid = element.grid;
    int64_t ix0, iy0, ix1, iy1;
    apply_exact_map(element.map, 0, y, ix0, iy0);
    apply_exact_map(element.map, problem.out_w - 1, y, ix1, iy1);
    if (grid.wrap) {
      const auto within = [](int64_t i, int64_t n) { return i >= 0 && i < n; };
      if (!(within(ix0, grid.bound_w) && within(ix1, grid.bound_w) &&
            within(iy0, grid.bound_h) && within(iy1, grid.bound_h))) {
        return false;
      }
    }
    const ExactTap start = exact_tap(ix0, iy0, grid), end = exact_tap(ix1, iy1, grid);
    if (!start.inside || !end.inside) return false;
    kind = RowKind::kLine;
    first = base + start.iy * src_sh + start.ix * src_sw;
    step = element.map.im[0] * src_sw + element.map.im[3] * src_sh;
    return true;
  }

  // `borrow_outside`: outside pixels take their taps from an inside neighbour (uint8 sources, see
  // borrow_outside_taps). `vector_pairs`: what of a paired row the applying copy reads.
  void build(const TransformProblem& problem, const TransformElement& element, int64_t y,
             int64_t src_sh, int64_t src_sw, bool borrow_outside, VectorPairs vector_pairs) {
    const int64_t width = problem.out_w;
    // A plan is rebuilt for rows of any element: nothing of the last row's kind may stay (write_row
    // reads `paired` before it looks at the kind).
    paired = false;
    paired32 = false;
    window_rows = 0;
    // The sampled grid: the window for circular elements, the whole source otherwise.
    const int64_t base =
        element.window ? problem.margin_y * src_sh + problem.margin_x * src_sw : 0;
    if (element.map.exact != 0) {
      if (build_line(problem, element, y, base, src_sh, src_sw)) return;
      kind = RowKind::kGather;
      for (int64_t x = 0; x < width; ++x) {
        int64_t ix, iy;
        apply_exact_map(element.map, x, y, ix, iy);
        const ExactTap tap = exact_tap(ix, iy, element.grid);
        offsets[x] = base + tap.iy * src_sh + tap.ix * src_sw;
        weights[x] = tap.inside ? 1.0 : 0.0;
      }
      return;
    }
    kind = RowKind::kBilinear;
    int64_t* o = offsets.data();
    double* w = weights.data();
    if (element.grid.wrap) {
      plan_bilinear_row<true>(element.map, element.grid, y, width, base, src_sh, src_sw, o,
                             o + width, o + 2 * width, o + 3 * width, w, w + width,
                             w + 2 * width, w + 3 * width);
    } else {
      plan_bilinear_row<false>(element.map, element.grid, y, width, base, src_sh, src_sw, o,
                              o + width, o + 2 * width, o + 3 * width, w, w + width,
                              w + 2 * width, w + 3 * width);
    }
    if (borrow_outside) borrow_outside_taps(width);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    paired = src_sw == 1;  // the pair loop reads x0 as the low byte of a 16-bit load
#else
    paired = false;
#endif
    // (Written without early exits, so that these loops vectorize.)
    const int64_t *o00 = o, *o01 = o + width, *o10 = o + 2 * width, *o11 = o + 3 * width;
    // Pairs whose x1 is not the byte after x0 (counted in an int: a bool does not vectorize).
    int64_t apart = 0;
    for (int64_t x = 0; x < width; ++x) {
      apart += static_cast<int64_t>(o01[x] != o00[x] + 1) |
               static_cast<int64_t>(o11[x] != o10[x] + 1);
    }
    paired = paired && apart == 0;
    if (!paired || vector_pairs == VectorPairs::kNone) return;
    int64_t last = 0;
    for (int64_t x = 0; x < width; ++x) last = std::max(last, std::max(o00[x], o10[x]));
    paired32 = last <= std::numeric_limits<int32_t>::max() - 4;
    if (!paired32) return;
    last_pair_offset = last;
    for (int64_t x = 0; x < width; ++x) {
      pair_offsets[x] = static_cast<int32_t>(offsets[x]);
      pair_offsets[width + x] = static_cast<int32_t>(offsets[2 * width + x]);
    }
    if (vector_pairs == VectorPairs::kWindows) build_windows(width, src_sh);
  }
};

template <typename scalar_t, typename out_t>
struct TransformJob {
  const TransformProblem& problem;
  const scalar_t* src;
  out_t* out;
  int64_t src_sn, src_sc, src_sh, src_sw;
  int64_t out_sn, out_sc, out_sh, out_sw;
  // Write rows with non-temporal stores (see transform_cpu_impl).
  bool stream;
  // One past the last source element the tensor's view reaches: the vector gathers read a few
  // bytes beyond a tap, and may only where they stay before it.
  const scalar_t* src_end;
  // Paired bilinear rows may be read through their windows (the processor has AVX-512 VBMI).
  bool windows;
};

// Copies `bytes` from src to dst with non-temporal stores where x86 has them: the destination's
// cache lines are written whole, without first being read (half the memory traffic of ordinary
// stores for an output much larger than the caches). The caller fences before the data is used.
inline void stream_copy(void* dst, const void* src, size_t bytes) {
#if defined(__SSE2__)
  auto* d = static_cast<char*>(dst);
  const auto* s = static_cast<const char*>(src);
  const size_t head = std::min(bytes, (16 - reinterpret_cast<uintptr_t>(d) % 16) % 16);
  std::memcpy(d, s, head);
  size_t i = head;
  for (; i + 16 <= bytes; i += 16) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + i),
                     _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)));
  }
  std::memcpy(d + i, s + i, bytes - i);
#else
  std::memcpy(dst, src, bytes);
#endif
}

inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// Output rows per task. Eight: a quarter turn's block is one 8-byte load per output column.
constexpr int64_t kRowBlock = 8;

// Tasks per element: blocks of kRowBlock rows, the last one partial.
inline int64_t row_blocks(int64_t out_h) { return (out_h + kRowBlock - 1) / kRowBlock; }

// dst[x] = last[-x] for x < count: a row read backwards (flips, half turns), eight bytes at a time
// (one load, a byte swap, one store) where a byte loop would run one byte per load.
inline void reverse_bytes(uint8_t* dst, const uint8_t* last, int64_t count) {
  int64_t x = 0;
#if defined(__GNUC__)
  for (; x + 8 <= count; x += 8) {
    // The byte swap reverses the eight bytes in either byte order: the byte at the lowest
    // address, last[-x - 7], lands at the highest, dst[x + 7].
    uint64_t bytes;
    std::memcpy(&bytes, last - x - 7, 8);
    bytes = __builtin_bswap64(bytes);
    std::memcpy(dst + x, &bytes, 8);
  }
#endif
  for (; x < count; ++x) dst[x] = last[-x];
}

// The kRowBlock rows of a quarter turn, gathered into block[r * width + x] =
// plane[first + r * order + x * step]: each output row walks down a source column (step a row
// stride) and the block's rows start in neighbouring columns (order +1 or -1), so that output
// column x of all kRowBlock rows is kRowBlock adjacent bytes of one source row. Eight such
// columns are loaded as eight 8-byte rows and transposed with SSE2 unpacks, where reading the
// columns byte by byte costs a load per byte.
inline void gather_quarter_turn(const uint8_t* plane, int64_t first, int64_t order, int64_t step,
                                int64_t width, uint8_t* block) {
  static_assert(kRowBlock == 8, "the transpose below is 8 x 8");
  int64_t x = 0;
#if defined(__SSE2__)
  // The lowest address of a column's bytes, and which row its byte j belongs to.
  const uint8_t* lowest = plane + first + (order > 0 ? 0 : 1 - kRowBlock);
  for (; x + 8 <= width; x += 8) {
    __m128i q[8];
    for (int i = 0; i < 8; ++i) {
      q[i] = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(lowest + (x + i) * step));
    }
    // q[i] byte j -> row j byte i, in three rounds of interleaving (bytes, pairs, quads).
    const __m128i a0 = _mm_unpacklo_epi8(q[0], q[1]), a1 = _mm_unpacklo_epi8(q[2], q[3]);
    const __m128i a2 = _mm_unpacklo_epi8(q[4], q[5]), a3 = _mm_unpacklo_epi8(q[6], q[7]);
    const __m128i b0 = _mm_unpacklo_epi16(a0, a1), b1 = _mm_unpackhi_epi16(a0, a1);
    const __m128i b2 = _mm_unpacklo_epi16(a2, a3), b3 = _mm_unpackhi_epi16(a2, a3);
    // c[k] holds the rows 2k (low half) and 2k + 1 (high half).
    const __m128i c[4] = {_mm_unpacklo_epi32(b0, b2), _mm_unpackhi_epi32(b0, b2),
                          _mm_unpacklo_epi32(b1, b3), _mm_unpackhi_epi32(b1, b3)};
    for (int k = 0; k < 4; ++k) {
      for (int half = 0; half < 2; ++half) {
        const int64_t j = 2 * k + half;
        const int64_t row = order > 0 ? j : kRowBlock - 1 - j;
        const __m128i bytes = half == 0 ? c[k] : _mm_unpackhi_epi64(c[k], c[k]);
        _mm_storel_epi64(reinterpret_cast<__m128i*>(block + row * width + x), bytes);
      }
    }
  }
#endif
  for (; x < width; ++x) {
    for (int64_t r = 0; r < kRowBlock; ++r) {
      block[r * width + x] = plane[first + r * order + x * step];
    }
  }
}

// Writes one output row (image plane `plane` of the source, channel normalization `normalize`)
// to `row` with element stride `stride`. The loops over x are written for the compiler's
// vectorizer: unit-stride reads of the plan, and for uint8 sources the gathers (which no vector
// ISA has for bytes) split off into a scalar copy into `taps`.
template <typename scalar_t>
struct RowScratch {
  std::vector<scalar_t> taps;    // uint8 sources: gathered tap values, [tap][x]
  std::vector<uint16_t> pairs;   // uint8 sources, paired rows: [top / bottom][x]
  std::vector<scalar_t> block;   // uint8 sources: a quarter turn's rows, [row][x]
  explicit RowScratch(int64_t width)
      : taps(std::is_same_v<scalar_t, uint8_t> ? 4 * width : 0),
        pairs(std::is_same_v<scalar_t, uint8_t> ? 2 * width : 0),
        block(std::is_same_v<scalar_t, uint8_t> ? kRowBlock * width : 0) {}
};

// row[x * stride] = normalize(source[x * step]) for x < width.
template <typename scalar_t, typename out_t, typename acc_t, bool kFused>
inline void write_line(const ChannelNormalizer<scalar_t, acc_t, kFused>& normalize,
                       const scalar_t* source, int64_t step, int64_t width, out_t* row,
                       int64_t stride) {
  if (stride == 1 && step == 1) {
    for (int64_t x = 0; x < width; ++x) row[x] = static_cast<out_t>(normalize(source[x]));
  } else {
    for (int64_t x = 0; x < width; ++x) {
      row[x * stride] = static_cast<out_t>(normalize(source[x * step]));
    }
  }
}

#if EQUIFAST_HAVE_AVX2_PATH
// Eight pixels x..x+7 of a paired bilinear row in the AVX-512 loops, from the byte values of
// their four taps (t00, t01: the top pair; t10, t11: the bottom pair) as float64. The arithmetic
// is the scalar loop's: each tap normalized by an fma, the four weighted in the same order in
// float64, rounded once.
template <typename out_t>
EQUIFAST_TARGET_AVX512 inline void write_bilinear_pixels_avx512(const RowPlan& plan, int64_t width,
                                                                __m512d t00, __m512d t01,
                                                                __m512d t10, __m512d t11,
                                                                double scale, double shift,
                                                                int64_t x, out_t* row,
                                                                int64_t stride) {
  const double* weights = plan.weights.data() + x;
  const __m512d vscale = _mm512_set1_pd(scale), vshift = _mm512_set1_pd(shift);
  const __m512d v00 = _mm512_fmadd_pd(t00, vscale, vshift);
  const __m512d v01 = _mm512_fmadd_pd(t01, vscale, vshift);
  const __m512d v10 = _mm512_fmadd_pd(t10, vscale, vshift);
  const __m512d v11 = _mm512_fmadd_pd(t11, vscale, vshift);
  __m512d value = _mm512_mul_pd(v00, _mm512_loadu_pd(weights));
  value = _mm512_fmadd_pd(v01, _mm512_loadu_pd(weights + width), value);
  value = _mm512_fmadd_pd(v10, _mm512_loadu_pd(weights + 2 * width), value);
  value = _mm512_fmadd_pd(v11, _mm512_loadu_pd(weights + 3 * width), value);
  if constexpr (std::is_same_v<out_t, float>) {
    if (stride == 1) {
      _mm256_storeu_ps(row + x, _mm512_cvtpd_ps(value));
      return;
    }
  } else if constexpr (std::is_same_v<out_t, double>) {
    if (stride == 1) {
      _mm512_storeu_pd(row + x, value);
      return;
    }
  }
  alignas(64) double values[8];
  _mm512_store_pd(values, value);
  for (int i = 0; i < 8; ++i) row[(x + i) * stride] = static_cast<out_t>(values[i]);
}

// The same from tap pairs as 32-bit lanes (low two bytes: x0, then x1) of the top and bottom
// source rows.
template <typename out_t>
EQUIFAST_TARGET_AVX512 inline void write_paired_pixels_avx512(const RowPlan& plan, int64_t width,
                                                              __m256i top_pairs,
                                                              __m256i bottom_pairs, double scale,
                                                              double shift, int64_t x, out_t* row,
                                                              int64_t stride) {
  const __m256i byte = _mm256_set1_epi32(0xff);
  // (A lambda here would not inherit the target attribute.)
  const __m512d t00 = _mm512_cvtepi32_pd(_mm256_and_si256(top_pairs, byte));
  const __m512d t01 = _mm512_cvtepi32_pd(_mm256_and_si256(_mm256_srli_epi32(top_pairs, 8), byte));
  const __m512d t10 = _mm512_cvtepi32_pd(_mm256_and_si256(bottom_pairs, byte));
  const __m512d t11 =
      _mm512_cvtepi32_pd(_mm256_and_si256(_mm256_srli_epi32(bottom_pairs, 8), byte));
  write_bilinear_pixels_avx512(plan, width, t00, t01, t10, t11, scale, shift, x, row, stride);
}

// The VBMI window loop's last step: eight pixels' tap pairs in one vector, as window_index puts
// them (pixel i's top pair at bytes 2i and 2i + 1, its bottom pair 16 bytes after). Each tap's
// eight bytes go into the low bytes of eight 64-bit lanes, zero above, by a byte permutation that
// zeroes the bytes it does not pick, and convert as 64-bit integers: one conversion per tap,
// where widening the pairs and parting their bytes took three times the instructions. (The same
// after the gathers of write_paired_row_avx512, the pairs joined into one vector, took 1.2x
// the time of its loop: 45-degree turns.)
struct PairSpread {
  __m512i top0, top1, bottom0, bottom1;  // byte 8i: where pixel i's tap is in the pairs
};

EQUIFAST_TARGET_AVX512_VBMI inline PairSpread pair_spread_vbmi() {
  return {_mm512_set_epi64(14, 12, 10, 8, 6, 4, 2, 0), _mm512_set_epi64(15, 13, 11, 9, 7, 5, 3, 1),
          _mm512_set_epi64(30, 28, 26, 24, 22, 20, 18, 16),
          _mm512_set_epi64(31, 29, 27, 25, 23, 21, 19, 17)};
}

template <typename out_t>
EQUIFAST_TARGET_AVX512_VBMI inline void write_pairs_vbmi(const RowPlan& plan, int64_t width,
                                                         __m512i pairs, const PairSpread& spread,
                                                         double scale, double shift, int64_t x,
                                                         out_t* row, int64_t stride) {
  constexpr __mmask64 kLowBytes = 0x0101010101010101ULL;
  const __m512d t00 =
      _mm512_cvtepi64_pd(_mm512_maskz_permutexvar_epi8(kLowBytes, spread.top0, pairs));
  const __m512d t01 =
      _mm512_cvtepi64_pd(_mm512_maskz_permutexvar_epi8(kLowBytes, spread.top1, pairs));
  const __m512d t10 =
      _mm512_cvtepi64_pd(_mm512_maskz_permutexvar_epi8(kLowBytes, spread.bottom0, pairs));
  const __m512d t11 =
      _mm512_cvtepi64_pd(_mm512_maskz_permutexvar_epi8(kLowBytes, spread.bottom1, pairs));
  write_bilinear_pixels_avx512(plan, width, t00, t01, t10, t11, scale, shift, x, row, stride);
}

// A paired bilinear row of a uint8 plane in the AVX-512 copies, eight pixels at a time: each tap
// pair is gathered as a 32-bit word straight into a vector, where the scalar loop copies the
// pairs through memory first (about half of a row's time). Returns where it stopped (a multiple
// of 8; the caller writes the tail).
template <typename out_t>
EQUIFAST_TARGET_AVX512 int64_t write_paired_row_avx512(const RowPlan& plan, double scale,
                                                       double shift, const uint8_t* plane,
                                                       int64_t width, out_t* row, int64_t stride) {
  const int32_t* top = plan.pair_offsets.data();
  const int32_t* bottom = top + width;
  const auto* base = reinterpret_cast<const int*>(plane);
  int64_t x = 0;
  for (; x + 8 <= width; x += 8) {
    const __m256i top_pairs = _mm256_i32gather_epi32(
        base, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(top + x)), 1);
    const __m256i bottom_pairs = _mm256_i32gather_epi32(
        base, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bottom + x)), 1);
    write_paired_pixels_avx512(plan, width, top_pairs, bottom_pairs, scale, shift, x, row,
                               stride);
  }
  return x;
}

// The same row through its windows (plan.window_rows > 0, see RowPlan), on processors with
// AVX-512 VBMI: per group, window_rows 16-byte loads into one vector and one byte permutation
// give the 16 pairs that two gathers of eight would. Not inlined: the AVX-512 copy that calls
// it runs where VBMI may be missing (the caller checks).
template <typename out_t>
__attribute__((noinline)) EQUIFAST_TARGET_AVX512_VBMI int64_t write_paired_windows_vbmi(
    const RowPlan& plan, double scale, double shift, const uint8_t* plane, int64_t width,
    out_t* row, int64_t stride) {
  const int64_t step = plan.window_stride;
  const int rows = plan.window_rows;
  const PairSpread spread = pair_spread_vbmi();
  int64_t x = 0;
  for (; x + 8 <= width; x += 8) {
    const int64_t g = x / 8;
    const uint8_t* window = plane + plan.window_first[g];
    __m512i windows =
        _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(window)));
    if (rows > 1) {
      windows = _mm512_inserti32x4(
          windows, _mm_loadu_si128(reinterpret_cast<const __m128i*>(window + step)), 1);
    }
    if (rows > 2) {
      windows = _mm512_inserti32x4(
          windows, _mm_loadu_si128(reinterpret_cast<const __m128i*>(window + 2 * step)), 2);
    }
    if (rows > 3) {
      windows = _mm512_inserti32x4(
          windows, _mm_loadu_si128(reinterpret_cast<const __m128i*>(window + 3 * step)), 3);
    }
    const __m256i index =
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(plan.window_index.data() + 32 * g));
    const __m512i pairs = _mm512_permutexvar_epi8(_mm512_castsi256_si512(index), windows);
    write_pairs_vbmi(plan, width, pairs, spread, scale, shift, x, row, stride);
  }
  return x;
}
#endif

template <typename scalar_t, typename out_t, typename acc_t, bool kFused, bool kVectorGather>
inline void write_row(const RowPlan& plan,
                      const ChannelNormalizer<scalar_t, acc_t, kFused>& normalize,
                      const scalar_t* plane, const scalar_t* src_end, int64_t width, out_t* row,
                      int64_t stride, RowScratch<scalar_t>& scratch) {
  scalar_t* taps = scratch.taps.data();
  constexpr bool kBytes = std::is_same_v<scalar_t, uint8_t>;
  const int64_t* offsets = plan.offsets.data();
  const double* weights = plan.weights.data();
  if (plan.kind == RowKind::kLine) {
    const scalar_t* source = plane + plan.first;
    int64_t step = plan.step;
    if constexpr (kBytes) {
      // Flips, half turns, and quarter turns outside a whole block: a copy into unit stride
      // (the vector loops do not gather bytes).
      if (step == -1) {
        reverse_bytes(taps, source, width);
      } else if (step != 1) {
        for (int64_t x = 0; x < width; ++x) taps[x] = source[x * step];
      }
      if (step != 1) {
        source = taps;
        step = 1;
      }
    }
    write_line(normalize, source, step, width, row, stride);
    return;
  }
  // Paired rows start at `first`: the pixels before it are written by the vector loop.
  int64_t first = 0;
#if EQUIFAST_HAVE_AVX2_PATH
  if constexpr (kBytes && kVectorGather) {
    // Both read bytes beyond the taps: only where the source goes on that far. (Windows are
    // planned only where the processor has VBMI.)
    if (plan.window_rows > 0 && plane + plan.last_window_byte <= src_end) {
      first = write_paired_windows_vbmi(plan, normalize.scale, normalize.shift, plane, width, row,
                                        stride);
      if (first == width) return;
    } else if (plan.paired32 && plane + plan.last_pair_offset + 4 <= src_end) {
      first = write_paired_row_avx512(plan, normalize.scale, normalize.shift, plane, width, row,
                                      stride);
      if (first == width) return;
    }
  }
#else
  (void)src_end;
#endif
  // The taps' source values, row-major by tap: gathered once, then read with unit stride.
  const int64_t tap_count = plan.kind == RowKind::kBilinear ? 4 : 1;
  if constexpr (kBytes) {
    if (plan.paired) {
      // Each tap pair (x0, x1) is two neighbouring bytes: one 16-bit load per pair, half the
      // gathers (the bytes then part in the vector loop below).
      uint16_t* pairs = scratch.pairs.data();
      for (int64_t x = first; x < width; ++x) {
        std::memcpy(pairs + x, plane + offsets[x], 2);
        std::memcpy(pairs + width + x, plane + offsets[2 * width + x], 2);
      }
    } else {
      for (int64_t i = 0; i < tap_count * width; ++i) taps[i] = plane[offsets[i]];
    }
  }
  auto tap = [&](int64_t t, int64_t x) -> scalar_t {
    if constexpr (kBytes) {
      return taps[t * width + x];
    } else {
      return plane[offsets[t * width + x]];
    }
  };
  if (plan.kind == RowKind::kGather) {
    for (int64_t x = 0; x < width; ++x) {
      // weights[x] is 0 or 1: the rounded value, or the fill.
      const acc_t weight = static_cast<acc_t>(weights[x]);
      row[x * stride] = static_cast<out_t>(normalize(tap(0, x)) * weight);
    }
    return;
  }
  // Bilinear: float64 sums in the reference's order ((v00 w00 + v01 w01) + v10 w10) + v11 w11,
  // rounded once.
  const double *w00 = weights, *w01 = weights + width, *w10 = weights + 2 * width,
               *w11 = weights + 3 * width;
  if (kBytes && plan.paired) {
    const uint16_t* top = scratch.pairs.data();
    const uint16_t* bottom = top + width;
    for (int64_t x = first; x < width; ++x) {
      // Little-endian pairs: the low byte is x0.
      double value = normalize.wide(static_cast<scalar_t>(top[x] & 0xff)) * w00[x];
      value += normalize.wide(static_cast<scalar_t>(top[x] >> 8)) * w01[x];
      value += normalize.wide(static_cast<scalar_t>(bottom[x] & 0xff)) * w10[x];
      value += normalize.wide(static_cast<scalar_t>(bottom[x] >> 8)) * w11[x];
      row[x * stride] = static_cast<out_t>(value);
    }
    return;
  }
  for (int64_t x = 0; x < width; ++x) {
    double value = normalize.wide(tap(0, x)) * w00[x];
    value += normalize.wide(tap(1, x)) * w01[x];
    value += normalize.wide(tap(2, x)) * w10[x];
    value += normalize.wide(tap(3, x)) * w11[x];
    row[x * stride] = static_cast<out_t>(value);
  }
}

// Whether the `rows` plans of a block are a quarter turn's that gather_quarter_turn reads: a whole
// block of line rows with one step other than +-1 (each walks down a source column) whose starts
// are neighbouring bytes. Returns the start's step from row to row (+1 or -1), 0 when not.
inline int64_t quarter_turn_order(const std::vector<RowPlan>& plans, int64_t rows) {
  if (rows != kRowBlock) return 0;
  const int64_t step = plans[0].step, order = plans[1].first - plans[0].first;
  if (step == 1 || step == -1 || (order != 1 && order != -1)) return 0;
  for (int64_t r = 0; r < rows; ++r) {
    const RowPlan& plan = plans[r];
    if (plan.kind != RowKind::kLine || plan.step != step ||
        plan.first != plans[0].first + r * order) {
      return 0;
    }
  }
  return order;
}

// Tasks are (element, block of kRowBlock output rows): a task builds its rows' plans once, then
// writes those rows of every image and channel (when streaming: each into `staged`, in cache,
// then out with stream_copy). Tasks are numbered block-major (task = block * elements + element):
// parallel_for hands each thread one contiguous range of tasks, and element-major numbering gave
// one thread the first elements and another the last, whose costs differ several-fold (a bilinear
// rotation against a quarter turn). Measured on 2 cores, 8 images of 224 px, the identity, three
// quarter turns, a flip and two bilinear rotations: 3.9 ms against 5.9 ms.
template <typename scalar_t, typename out_t, typename acc_t, bool kFused, bool kVectorGather>
inline void transform_range(const TransformJob<scalar_t, out_t>& job,
                            const Normalizer<scalar_t, acc_t>& normalizer, int64_t begin,
                            int64_t end) {
  constexpr bool kBytes = std::is_same_v<scalar_t, uint8_t>;
  const TransformProblem& problem = job.problem;
  const int64_t batch = problem.batch, width = problem.out_w;
  const int64_t elements = static_cast<int64_t>(problem.elements.size());
  std::vector<RowPlan> plans(kRowBlock, RowPlan(width));
  const VectorPairs vector_pairs = !(kBytes && kVectorGather) ? VectorPairs::kNone
                                   : job.windows              ? VectorPairs::kWindows
                                                              : VectorPairs::kGathers;
  RowScratch<scalar_t> scratch(width);
  std::vector<out_t> staged(job.stream ? width : 0);
  for (int64_t task = begin; task < end; ++task) {
    const int64_t e = task % elements, y0 = (task / elements) * kRowBlock;
    const int64_t rows = std::min(kRowBlock, problem.out_h - y0);
    for (int64_t r = 0; r < rows; ++r) {
      plans[r].build(problem, problem.elements[e], y0 + r, job.src_sh, job.src_sw, kBytes,
                     vector_pairs);
    }
    const int64_t order = kBytes ? quarter_turn_order(plans, rows) : 0;
    for (int64_t b = 0; b < batch; ++b) {
      for (int c = 0; c < 3; ++c) {
        const ChannelNormalizer<scalar_t, acc_t, kFused> normalize(normalizer, c);
        const scalar_t* plane = job.src + b * job.src_sn + c * job.src_sc;
        if constexpr (kBytes) {
          if (order != 0) {
            gather_quarter_turn(plane, plans[0].first, order, plans[0].step, width,
                                scratch.block.data());
          }
        }
        for (int64_t r = 0; r < rows; ++r) {
          out_t* row =
              job.out + (e * batch + b) * job.out_sn + c * job.out_sc + (y0 + r) * job.out_sh;
          out_t* target = job.stream ? staged.data() : row;
          const int64_t stride = job.stream ? 1 : job.out_sw;
          if (order != 0) {
            write_line(normalize, scratch.block.data() + r * width, 1, width, target, stride);
          } else {
            write_row<scalar_t, out_t, acc_t, kFused, kVectorGather>(
                plans[r], normalize, plane, job.src_end, width, target, stride, scratch);
          }
          if (job.stream) stream_copy(row, staged.data(), width * sizeof(out_t));
        }
      }
    }
  }
  if (job.stream) stream_fence();
}

#if EQUIFAST_HAVE_AVX2_PATH
template <typename scalar_t, typename out_t, typename acc_t, bool kFused>
EQUIFAST_TARGET_AVX2 void transform_range_avx2(const TransformJob<scalar_t, out_t>& job,
                                               const Normalizer<scalar_t, acc_t>& normalizer,
                                               int64_t begin, int64_t end) {
  transform_range<scalar_t, out_t, acc_t, kFused, false>(job, normalizer, begin, end);
}

template <typename scalar_t, typename out_t, typename acc_t, bool kFused>
EQUIFAST_TARGET_AVX512 void transform_range_avx512(const TransformJob<scalar_t, out_t>& job,
                                                   const Normalizer<scalar_t, acc_t>& normalizer,
                                                   int64_t begin, int64_t end) {
  transform_range<scalar_t, out_t, acc_t, kFused, true>(job, normalizer, begin, end);
}
#endif

// Outputs of at least this many bytes are written with non-temporal stores. They pay off only
// once the output is beyond the last-level cache (it is written once, then read by the model);
// below that they cost more than ordinary stores, which leave the output in cache. Measured with
// 8 images of 224 px on 2 threads (one block is 4.8 MB): on a Xeon with 260 MB of L3, 7 identity
// blocks (34 MB) 1.31 ms against 2.17 ms streamed, 9 blocks of translations (43 MB) 1.68 ms
// against 2.84 ms, and with fresh pages (bench_ops.py) 12.4-14.2 ms against 15.6-16.4 ms; on a
// 2-core EPYC with 32 MB of L3 (9 blocks written, then summed), 22 MB 1.23 ms against 1.43 ms
// streamed, 43 MB 3.13 ms against 2.76 ms. Hence the size of the last-level cache as glibc
// reports it (what its own memcpy goes by), 32 MiB where it reports none, and
// EQUIFAST_STREAM_BYTES (bytes, read on every call) in its place where that size misleads: a
// virtual machine may be shown its host's cache (and the tests set it, to run both paths).
inline size_t stream_threshold_bytes() {
  if (const char* value = std::getenv("EQUIFAST_STREAM_BYTES"); value != nullptr && *value) {
    char* end = nullptr;
    errno = 0;
    const long long bytes = std::strtoll(value, &end, 10);
    TORCH_CHECK(errno == 0 && *end == '\0' && bytes >= 0,
                "EQUIFAST_STREAM_BYTES must be a number of bytes (an integer of 0 or more), but "
                "got '", value, "'.");
    return static_cast<size_t>(bytes);
  }
  static const size_t last_level_cache = [] {
    long bytes = -1;
#if defined(_SC_LEVEL3_CACHE_SIZE)
    bytes = sysconf(_SC_LEVEL3_CACHE_SIZE);
#endif
    return bytes > 0 ? static_cast<size_t>(bytes) : size_t{32} << 20;
  }();
  return last_level_cache;
}

template <typename scalar_t, typename out_t, typename acc_t>
void transform_cpu_impl(const at::Tensor& src, const TransformProblem& problem, at::Tensor& out) {
  // (The staged rows are copied out whole: rows contiguous in memory only.)
  const bool stream = out.stride(3) == 1 && out.nbytes() >= stream_threshold_bytes();
  int64_t last_element = 0;  // of the source's view (torch strides are not negative)
  for (int64_t d = 0; d < src.dim(); ++d) last_element += (src.size(d) - 1) * src.stride(d);
  const TransformJob<scalar_t, out_t> job{problem,       src.const_data_ptr<scalar_t>(),
                                          out.data_ptr<out_t>(),
                                          src.stride(0), src.stride(1), src.stride(2),
                                          src.stride(3), out.stride(0), out.stride(1),
                                          out.stride(2), out.stride(3), stream,
                                          src.const_data_ptr<scalar_t>() + last_element + 1,
                                          use_avx512_vbmi()};
  const Normalizer<scalar_t, acc_t> normalizer(problem);
  const bool avx2 = use_avx2();
  const bool avx512 = use_avx512();
  // The fused normalization needs a hardware fma: only the AVX2 and AVX-512 copies use it.
  const bool fused = normalizer.arithmetic_is_exact && avx2;
  const int64_t elements = static_cast<int64_t>(problem.elements.size());
  const int64_t blocks = row_blocks(problem.out_h);
  const int64_t grain = std::max<int64_t>(
      1, 16384 / std::max<int64_t>(1, problem.batch * 3 * problem.out_w * kRowBlock));
  parallel_for(0, elements * blocks, grain, [&](int64_t begin, int64_t end) {
#if EQUIFAST_HAVE_AVX2_PATH
    if constexpr (std::is_same_v<scalar_t, uint8_t>) {
      if (avx512 && fused) {
        return transform_range_avx512<scalar_t, out_t, acc_t, true>(job, normalizer, begin, end);
      }
      if (avx2 && fused) {
        return transform_range_avx2<scalar_t, out_t, acc_t, true>(job, normalizer, begin, end);
      }
    }
    if (avx512) {
      return transform_range_avx512<scalar_t, out_t, acc_t, false>(job, normalizer, begin, end);
    }
    if (avx2) {
      return transform_range_avx2<scalar_t, out_t, acc_t, false>(job, normalizer, begin, end);
    }
#endif
    transform_range<scalar_t, out_t, acc_t, false, false>(job, normalizer, begin, end);
  });
  (void)avx2;
  (void)avx512;
  (void)fused;
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
  if (poison_outputs()) out.fill_(std::numeric_limits<double>::quiet_NaN());  // tests
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
