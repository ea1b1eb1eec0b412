// Affine source maps and the sampling rules shared by the CPU and CUDA kernels.
//
// The single source of truth of the index arithmetic is equifast/ops/_reference.py (_sample_plan);
// every function here mirrors it, and the CPU tests compare against it, so that the CUDA kernels,
// which include this very header, compute the same indices.
//
// Convention:
//   A source map is a 2x3 matrix acting on (x, y, 1): x is the column, y the row, pixel centres at
//   integer coordinates, origin at the top-left pixel. Output position (x, y) reads the source
//   position (m[0] x + m[1] y + m[2], m[3] x + m[4] y + m[5]).
//   - Integer maps (all entries within kIntegerTolerance of an integer, decided once on the host)
//     are applied by index arithmetic: one tap, exactly.
//   - Other maps sample bilinearly: x0 = floor(sx), fx = sx - x0, neighbours x0 and x0 + 1.
//   - With wrapping, indices wrap modulo the window ("bound"); everything is valid.
//   - Without it, a position is valid when its source lies inside the sampled grid (for bilinear
//     maps within kEdgeTolerance), and inside the window too when the window is bounded (zero
//     protocol); the neighbours are clamped into the grid, so that a source exactly on the last row
//     reads that row, and an invalid position still reads memory inside the grid.
//   - With a disc (the `mask="disc"` of equifast.measure), a position is valid only where it and
//     its source both lie inside the disc inscribed in the model input, an ellipse on a grid
//     whose strides differ: ((x - cx) / rx)^2 + ((y - cy) / ry)^2 <= 1 + kDiscTolerance.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace equifast {

// Entries closer than this to an integer count as integers (equifast.groups.INTEGER_TOLERANCE).
constexpr double kIntegerTolerance = 1e-6;
// A bilinear source up to this far outside the grid still counts as inside
// (_reference.EDGE_TOLERANCE).
constexpr double kEdgeTolerance = 1e-6;
// A point this far (in squared normalized radius) outside a disc still counts as inside it
// (_reference.DISC_TOLERANCE): points on the circle in exact arithmetic stay inside.
constexpr double kDiscTolerance = 1e-9;

// Protocol codes of transform_images (equifast.groups.PROTOCOL_CODES).
constexpr int64_t kProtocolCrop = 0;
constexpr int64_t kProtocolCircular = 1;
constexpr int64_t kProtocolZero = 2;

// One source map, ready for a kernel (a plain struct: passed by value or copied to the device).
struct SourceMap {
  double m[6];      // (x, y) order: sx = m[0] x + m[1] y + m[2], sy = m[3] x + m[4] y + m[5]
  int64_t im[6];    // the same entries rounded to integers (used when exact)
  int32_t exact;    // 1: integer map, applied by index arithmetic
  int32_t wrap;     // 1: indices wrap around the window (circular protocol)
  int32_t has_disc;  // 1: positions count only inside the disc (never with wrap: host-checked)
  double disc[4];    // the disc in grid coordinates: centre cx, cy and radii rx, ry
};

// Whether all six entries are integers within kIntegerTolerance (host only: decided once per map).
inline bool is_integer_map(const double* m) {
  for (int i = 0; i < 6; ++i) {
    if (!(std::fabs(m[i] - std::nearbyint(m[i])) <= kIntegerTolerance)) return false;
  }
  return true;
}

// Host: build a SourceMap from 6 doubles in (x, y) order.
inline SourceMap make_source_map(const double* m, bool wrap) {
  SourceMap map{};
  for (int i = 0; i < 6; ++i) {
    map.m[i] = m[i];
    map.im[i] = static_cast<int64_t>(std::nearbyint(m[i]));
  }
  map.exact = is_integer_map(m) ? 1 : 0;
  map.wrap = wrap ? 1 : 0;
  map.has_disc = 0;
  return map;
}

// Host: restrict a map's valid positions to the disc (cx, cy, rx, ry) in grid coordinates.
inline void set_disc(SourceMap& map, const double* disc) {
  map.has_disc = 1;
  for (int i = 0; i < 4; ++i) map.disc[i] = disc[i];
}

// i modulo n in [0, n) for any sign of i (C++ % truncates towards zero).
C10_HOST_DEVICE inline int64_t wrap_index(int64_t i, int64_t n) {
  const int64_t r = i % n;
  return r < 0 ? r + n : r;
}

C10_HOST_DEVICE inline int64_t clamp_index(int64_t i, int64_t n) {
  return i < 0 ? 0 : (i >= n ? n - 1 : i);
}

// The continuous source of output position (x, y), computed in the reference's order:
// (m0 * x + m1 * y) + m2, in float64, each operation rounded on its own. On the GPU the
// intrinsics keep nvcc from contracting into fused multiply-adds, so that the device decides
// validity and floor() exactly as the host (which counts the valid positions) and the reference.
C10_HOST_DEVICE inline void apply_map(const SourceMap& map, double x, double y, double& sx,
                                      double& sy) {
#if defined(__CUDA_ARCH__)
  sx = __dadd_rn(__dadd_rn(__dmul_rn(map.m[0], x), __dmul_rn(map.m[1], y)), map.m[2]);
  sy = __dadd_rn(__dadd_rn(__dmul_rn(map.m[3], x), __dmul_rn(map.m[4], y)), map.m[5]);
#else
  sx = map.m[0] * x + map.m[1] * y + map.m[2];
  sy = map.m[3] * x + map.m[4] * y + map.m[5];
#endif
}

// The integer source of output position (x, y) of an exact map.
C10_HOST_DEVICE inline void apply_exact_map(const SourceMap& map, int64_t x, int64_t y, int64_t& ix,
                                            int64_t& iy) {
  ix = map.im[0] * x + map.im[1] * y + map.im[2];
  iy = map.im[3] * x + map.im[4] * y + map.im[5];
}

// Where a map samples. The sampled grid is size_h x size_w; source coordinates are in *window*
// coordinates and land at + offset in the grid (the crop margin). Wrapping is modulo the window
// bound_h x bound_w (offset ignored: the caller points the grid at the window itself). When
// bounded (zero protocol), validity is also checked against the window.
struct SampleGrid {
  int64_t size_h, size_w;
  int64_t offset_y, offset_x;
  int64_t bound_h, bound_w;
  bool wrap;
  bool bounded;
};

// A feature grid realigned onto itself: no offset, window = grid.
C10_HOST_DEVICE inline SampleGrid feature_grid(int64_t h, int64_t w, bool wrap) {
  SampleGrid grid{h, w, 0, 0, h, w, wrap, false};
  return grid;
}

// One exact tap: grid indices (always inside the grid) and whether the position is valid.
struct ExactTap {
  int64_t iy, ix;
  bool inside;
};

// Mirrors the integer branch of _reference._sample_plan for the source (ix, iy) (window coords).
C10_HOST_DEVICE inline ExactTap exact_tap(int64_t ix, int64_t iy, const SampleGrid& grid) {
  ExactTap tap;
  if (grid.wrap) {
    tap.ix = wrap_index(ix, grid.bound_w);
    tap.iy = wrap_index(iy, grid.bound_h);
    tap.inside = true;
    return tap;
  }
  const int64_t gx = ix + grid.offset_x;
  const int64_t gy = iy + grid.offset_y;
  bool inside = gx >= 0 && gx < grid.size_w && gy >= 0 && gy < grid.size_h;
  if (grid.bounded) inside = inside && ix >= 0 && ix < grid.bound_w && iy >= 0 && iy < grid.bound_h;
  tap.ix = clamp_index(gx, grid.size_w);
  tap.iy = clamp_index(gy, grid.size_h);
  tap.inside = inside;
  return tap;
}

// Four bilinear taps: neighbour grid indices (inside the grid), weights in the order
// (y0, x0), (y0, x1), (y1, x0), (y1, x1), and whether the position is valid.
struct BilinearTaps {
  int64_t y0, y1, x0, x1;
  double w00, w01, w10, w11;
  bool inside;
};

// The weights of bilinear_taps and the top-left neighbour (x0, y0), before any wrapping or
// clamping.
C10_HOST_DEVICE inline BilinearTaps bilinear_weights(double sx, double sy, int64_t& x0,
                                                     int64_t& y0) {
  BilinearTaps taps;
  const double x0f = ::floor(sx);
  const double y0f = ::floor(sy);
  const double fx = sx - x0f;
  const double fy = sy - y0f;
  x0 = static_cast<int64_t>(x0f);
  y0 = static_cast<int64_t>(y0f);
  taps.w00 = (1.0 - fy) * (1.0 - fx);
  taps.w01 = (1.0 - fy) * fx;
  taps.w10 = fy * (1.0 - fx);
  taps.w11 = fy * fx;
  return taps;
}

// bilinear_taps for a grid that does not wrap (crop and zero protocols): the neighbours clamped
// into the grid. Written with bitwise & and | rather than && and ||, and without a branch, so
// that the CPU kernel's loop over a row's pixels has no control flow and vectorizes.
C10_HOST_DEVICE inline BilinearTaps bilinear_taps_clamped(double sx, double sy,
                                                          const SampleGrid& grid) {
  int64_t x0, y0;
  BilinearTaps taps = bilinear_weights(sx, sy, x0, y0);
  // Validity of the continuous source, in grid coordinates (the margin added) ...
  const double gx = sx + static_cast<double>(grid.offset_x);
  const double gy = sy + static_cast<double>(grid.offset_y);
  const double last_x = static_cast<double>(grid.size_w - 1);
  const double last_y = static_cast<double>(grid.size_h - 1);
  const bool in_grid = (gx >= -kEdgeTolerance) & (gx <= last_x + kEdgeTolerance) &
                       (gy >= -kEdgeTolerance) & (gy <= last_y + kEdgeTolerance);
  // ... and in the window when it is bounded (zero protocol).
  const bool in_window = (sx >= -kEdgeTolerance) &
                         (sx <= static_cast<double>(grid.bound_w - 1) + kEdgeTolerance) &
                         (sy >= -kEdgeTolerance) &
                         (sy <= static_cast<double>(grid.bound_h - 1) + kEdgeTolerance);
  const bool inside = in_grid & (in_window | !grid.bounded);
  taps.x0 = clamp_index(x0 + grid.offset_x, grid.size_w);
  taps.x1 = clamp_index(x0 + grid.offset_x + 1, grid.size_w);
  taps.y0 = clamp_index(y0 + grid.offset_y, grid.size_h);
  taps.y1 = clamp_index(y0 + grid.offset_y + 1, grid.size_h);
  taps.inside = inside;
  return taps;
}

// Mirrors the bilinear branch of _reference._sample_plan for the source (sx, sy) (window coords).
C10_HOST_DEVICE inline BilinearTaps bilinear_taps(double sx, double sy, const SampleGrid& grid) {
  if (!grid.wrap) return bilinear_taps_clamped(sx, sy, grid);
  int64_t x0, y0;
  BilinearTaps taps = bilinear_weights(sx, sy, x0, y0);
  taps.x0 = wrap_index(x0, grid.bound_w);
  taps.x1 = wrap_index(x0 + 1, grid.bound_w);
  taps.y0 = wrap_index(y0, grid.bound_h);
  taps.y1 = wrap_index(y0 + 1, grid.bound_h);
  taps.inside = true;
  return taps;
}

// Whether the point (x, y) of the grid lies inside the map's disc (always, without one), in the
// reference's order of operations, each rounded on its own (the intrinsics keep nvcc from
// contracting into fused multiply-adds, as in apply_map).
C10_HOST_DEVICE inline bool inside_disc(const SourceMap& map, double x, double y) {
  if (!map.has_disc) return true;
#if defined(__CUDA_ARCH__)
  const double u = __ddiv_rn(__dsub_rn(x, map.disc[0]), map.disc[2]);
  const double v = __ddiv_rn(__dsub_rn(y, map.disc[1]), map.disc[3]);
  return __dadd_rn(__dmul_rn(u, u), __dmul_rn(v, v)) <= 1.0 + kDiscTolerance;
#else
  const double u = (x - map.disc[0]) / map.disc[2];
  const double v = (y - map.disc[1]) / map.disc[3];
  return u * u + v * v <= 1.0 + kDiscTolerance;
#endif
}

// The disc part of a position's validity: the output position (x, y) and its source (sx, sy)
// (for an exact map the integer source) both inside the disc.
C10_HOST_DEVICE inline bool inside_discs(const SourceMap& map, double x, double y, double sx,
                                         double sy) {
  return !map.has_disc || (inside_disc(map, x, y) && inside_disc(map, sx, sy));
}

// Validity of output position (x, y) under a map (the mask of the comparison).
C10_HOST_DEVICE inline bool position_valid(const SourceMap& map, int64_t x, int64_t y,
                                           const SampleGrid& grid) {
  if (map.exact) {
    int64_t ix, iy;
    apply_exact_map(map, x, y, ix, iy);
    return exact_tap(ix, iy, grid).inside &&
           inside_discs(map, static_cast<double>(x), static_cast<double>(y),
                        static_cast<double>(ix), static_cast<double>(iy));
  }
  double sx, sy;
  apply_map(map, static_cast<double>(x), static_cast<double>(y), sx, sy);
  return bilinear_taps(sx, sy, grid).inside &&
         inside_discs(map, static_cast<double>(x), static_cast<double>(y), sx, sy);
}

}  // namespace equifast
