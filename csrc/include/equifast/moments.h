// Running moments of a pair of values (a, b): the six sufficient statistics of a comparison.
//
//   count, mean_a, mean_b, m2_a = sum (a - mean_a)^2, m2_b = sum (b - mean_b)^2,
//   c_ab = sum (a - mean_a)(b - mean_b)
//
// Shared by the CPU and CUDA kernels, which accumulate single-pass sums of values taken relative
// to a per-channel shift (one of the values) and turn them into moments with
// moments_from_shifted_sums(): with a common shift, partial sums of threads and chunks merge by
// plain addition. PairMoments also offers Welford updates and Chan's parallel merge (centred
// quantities throughout), for running moments whose parts do not share a shift (pooling over
// images: _reference.merge_stats is the same formula). Either way a map with a large offset
// (mean 1e4, spread 1) keeps its correlation, where sum-of-squares formulas lose every digit.
#pragma once

#include <c10/macros/Macros.h>

namespace equifast {

template <typename T>
struct PairMoments {
  T count;
  T mean_a;
  T mean_b;
  T m2_a;
  T m2_b;
  T c_ab;

  C10_HOST_DEVICE void reset() {
    count = T(0);
    mean_a = T(0);
    mean_b = T(0);
    m2_a = T(0);
    m2_b = T(0);
    c_ab = T(0);
  }

  // Welford: one more pair. c_ab uses the old mean of a and the new mean of b (exact update).
  C10_HOST_DEVICE void update(T a, T b) {
    count += T(1);
    const T inv_count = T(1) / count;
    const T delta_a = a - mean_a;
    const T delta_b = b - mean_b;
    mean_a += delta_a * inv_count;
    mean_b += delta_b * inv_count;
    const T after_b = b - mean_b;
    m2_a += delta_a * (a - mean_a);
    m2_b += delta_b * after_b;
    c_ab += delta_a * after_b;
  }

  // Chan et al.: merge the moments of a disjoint set of pairs.
  C10_HOST_DEVICE void merge(const PairMoments& other) {
    if (other.count == T(0)) return;
    if (count == T(0)) {
      *this = other;
      return;
    }
    const T total = count + other.count;
    const T delta_a = other.mean_a - mean_a;
    const T delta_b = other.mean_b - mean_b;
    const T other_share = other.count / total;
    const T cross = count * other_share;  // count * other.count / total
    mean_a += delta_a * other_share;
    mean_b += delta_b * other_share;
    m2_a += other.m2_a + delta_a * delta_a * cross;
    m2_b += other.m2_b + delta_b * delta_b * cross;
    c_ab += other.c_ab + delta_a * delta_b * cross;
    count = total;
  }

  // Moments of values fed relative to (shift_a, shift_b) -> moments of the values themselves.
  C10_HOST_DEVICE void unshift(T shift_a, T shift_b) {
    if (count == T(0)) return;  // an empty comparison stays all zeros (the reference's convention)
    mean_a += shift_a;
    mean_b += shift_b;
  }

  // Writes the six numbers in the order of _reference.STATS_FIELDS.
  template <typename Out>
  C10_HOST_DEVICE void store(Out* out) const {
    out[0] = static_cast<Out>(count);
    out[1] = static_cast<Out>(mean_a);
    out[2] = static_cast<Out>(mean_b);
    out[3] = static_cast<Out>(m2_a);
    out[4] = static_cast<Out>(m2_b);
    out[5] = static_cast<Out>(c_ab);
  }
};

// The moments of n pairs from single-pass sums of values taken relative to shifts:
//   s_a = sum (a - shift_a), s_aa = sum (a - shift_a)^2, s_ab = sum (a - shift_a)(b - shift_b), ...
// With a shift that is one of the values (the kernels take the first valid position), the
// centring below loses about (mean - shift)^2 / variance units in the last place, i.e. nothing
// for offset data (mean 1e4, spread 1), where plain sums of squares would lose every digit.
template <typename T>
C10_HOST_DEVICE inline PairMoments<T> moments_from_shifted_sums(T count, T shift_a, T shift_b,
                                                               T s_a, T s_b, T s_aa, T s_bb,
                                                               T s_ab) {
  PairMoments<T> moments;
  moments.reset();
  if (count == T(0)) return moments;  // an empty comparison stays all zeros
  const T inv_count = T(1) / count;
  const T mean_a = s_a * inv_count;
  const T mean_b = s_b * inv_count;
  const T m2_a = s_aa - s_a * mean_a;
  const T m2_b = s_bb - s_b * mean_b;
  moments.count = count;
  moments.mean_a = shift_a + mean_a;
  moments.mean_b = shift_b + mean_b;
  moments.m2_a = m2_a > T(0) ? m2_a : T(0);  // a sum of squares: clip rounding below zero
  moments.m2_b = m2_b > T(0) ? m2_b : T(0);
  moments.c_ab = s_ab - s_a * mean_b;
  return moments;
}

}  // namespace equifast
