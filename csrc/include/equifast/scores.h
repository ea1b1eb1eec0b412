// Scores of compared pairs from their per-channel statistics (host and device code).
//
// The same definitions as equifast/scores.py (the pure-PyTorch path, its reference): per layer,
// eleven channel sums of the six statistics (count, mean_a, mean_b, m2_a, m2_b, c_ab), then the
// scores from those sums. Sums run in channel order, in float64. The per-channel terms are written
// as in scores.py (sums of squares and products about zero from the centred moments, so that
// large offsets do not cancel), and so are the flat-channel test and the NaN rules: a score is NaN
// where its denominator is not positive (no valid position, all channels flat).
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <limits>

namespace equifast {

// Order of the scores in the op's output (equifast.scores.METRICS).
enum ScoreIndex : int {
  kCorr = 0,
  kOneMinusCorr,
  kCorrChannelwise,
  kFlatFrac,
  kCosine,
  kNde,
  kRelErr,
  kPsnr,
  kScoreCount
};

// A channel is flat when its spatial variance is below (1e-6 of its mean level)^2 + (1e-15)^2
// (scores.FLAT_RELATIVE, scores.FLAT_ABSOLUTE).
constexpr double kFlatRelative = 1e-6;
constexpr double kFlatAbsolute = 1e-15;

struct ChannelSums {
  double total = 0, m2_a = 0, m2_b = 0, c_ab = 0;  // count and the centred moments
  double aa = 0, bb = 0, ab = 0;                   // sums of squares and products about zero
  double sq_diff = 0;                              // sum (a - b)^2
  double flat = 0, channelwise = 0;                // flat channels, sum of per-channel corr
  // b's values about their grand mean (psnr's peak), merged channel by channel (Chan et al.):
  // bb - total * mean^2 cancels (b = 1 + 1e-8 x keeps none of its spread's digits)
  double b_count = 0, b_mean = 0, b_m2 = 0;

  // Adds one channel's statistics {count, mean_a, mean_b, m2_a, m2_b, c_ab}.
  C10_HOST_DEVICE inline void add(const double* s) {
    const double count = s[0], mean_a = s[1], mean_b = s[2], m2a = s[3], m2b = s[4], c = s[5];
    const double weighted_a = count * mean_a, channel_weighted_b = count * mean_b;
    const double difference = mean_a - mean_b;
    total += count;
    m2_a += m2a;
    m2_b += m2b;
    c_ab += c;
    aa += m2a + weighted_a * mean_a;
    bb += m2b + channel_weighted_b * mean_b;
    ab += c + weighted_a * mean_b;
    sq_diff += m2a + m2b - 2 * c + count * difference * difference;
    if (count > 0) {
      const double merged = b_count + count;
      const double delta = mean_b - b_mean;
      b_mean += delta * (count / merged);
      b_m2 += m2b + delta * delta * (b_count * count / merged);
      b_count = merged;
    }
    const double safe = count > 0 ? count : 1.0;
    const double relative_a = kFlatRelative * mean_a, relative_b = kFlatRelative * mean_b;
    const double floor = kFlatAbsolute * kFlatAbsolute;
    const bool is_flat = m2a / safe <= relative_a * relative_a + floor ||
                         m2b / safe <= relative_b * relative_b + floor;
    if (is_flat) {
      flat += 1;
    } else {
      channelwise += c / std::sqrt(m2a * m2b);
    }
  }
};

C10_HOST_DEVICE inline double safe_div(double num, double den) {
  return den > 0 ? num / den : std::numeric_limits<double>::quiet_NaN();
}

// The kScoreCount scores of one layer of `channels` channels from its sums. Without
// `has_psnr_range` the psnr peak is four standard deviations of b (all valid values, around their
// global mean), else `psnr_range`.
C10_HOST_DEVICE inline void scores_from_sums(const ChannelSums& s, int64_t channels,
                                             bool has_psnr_range, double psnr_range,
                                             double* out) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  // A sum of squares: rounding can take it just below zero; then it is zero (NaN stays NaN).
  const double sq_diff = s.sq_diff < 0 ? 0.0 : s.sq_diff;
  const double count = static_cast<double>(channels);
  const double corr = safe_div(s.c_ab, std::sqrt(s.m2_a * s.m2_b));
  out[kCorr] = corr;
  out[kOneMinusCorr] = 1.0 - corr;
  out[kFlatFrac] = s.total <= 0 ? nan : s.flat / count;
  out[kCorrChannelwise] = s.total <= 0 ? nan : safe_div(s.channelwise, count - s.flat);
  out[kCosine] = safe_div(s.ab, std::sqrt(s.aa * s.bb));
  out[kNde] = safe_div(sq_diff, s.aa + s.bb);
  out[kRelErr] = std::sqrt(safe_div(sq_diff, s.bb));
  const double mse = safe_div(sq_diff, s.total);
  double peak = psnr_range;
  if (!has_psnr_range) {
    peak = 4.0 * std::sqrt(safe_div(s.b_m2, s.total));
  }
  // Maps equal to the last bit (mse exactly 0: an exact re-alignment of a shift by a multiple of
  // the stride) have an infinite PSNR, as skimage and torchmetrics give it; 0 / 0 (b constant and
  // a equal to it) has none.
  const double peak2 = peak * peak;
  out[kPsnr] = mse == 0.0 ? (peak2 > 0 ? std::numeric_limits<double>::infinity() : nan)
                          : 10.0 * std::log10(safe_div(peak2, mse));
}

}  // namespace equifast
