// score_stats on the CPU: the scores of compared pairs from their per-channel statistics, for one
// or several layers whose channels lie one after the other.
//
// The engine scores every layer of every forward: in torch ops that is about 60 small ops per
// call, each paying its dispatch, where the arithmetic is a few microseconds. Here one pass per
// (row, layer) accumulates the eleven channel sums and turns them into the scores (the math is
// equifast/scores.h, shared with any other backend). Rows are independent: parallel over rows.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "equifast/checks.h"
#include "equifast/parallel.h"
#include "equifast/poison.h"
#include "equifast/scores.h"

namespace equifast {
namespace {

at::Tensor score_stats_cpu(const at::Tensor& stats, c10::IntArrayRef channel_counts,
                           std::optional<double> psnr_range) {
  check_defined(stats, "stats");
  check_device_cpu(stats, "stats");
  check_dtype(stats, "stats", at::kDouble);
  EQUIFAST_CHECK_ARG(stats.dim() >= 2, "stats", "must have shape (..., C, 6), but got shape ",
                     stats.sizes(), ".");
  check_size(stats, "stats", stats.dim() - 1, 6, "statistics per channel");
  check_contiguous(stats, "stats");
  const int64_t channels = stats.size(-2);
  const int64_t layers = static_cast<int64_t>(channel_counts.size());
  EQUIFAST_CHECK_VALUE(layers >= 1, "channel_counts", "must have at least one entry, but got none.");
  std::vector<int64_t> starts(layers + 1, 0);
  for (int64_t i = 0; i < layers; ++i) {
    check_positive(channel_counts[i], ("channel_counts[" + std::to_string(i) + "]").c_str());
    starts[i + 1] = starts[i] + channel_counts[i];
  }
  EQUIFAST_CHECK_VALUE(starts[layers] == channels, "channel_counts", channel_counts, " add up to ",
                       starts[layers], ", but the stats have ", channels, " channels.");

  std::vector<int64_t> out_shape(stats.sizes().begin(), stats.sizes().end() - 2);
  out_shape.push_back(layers);
  out_shape.push_back(kScoreCount);
  at::Tensor out = at::empty(out_shape, stats.options());
  if (poison_outputs()) out.fill_(std::numeric_limits<double>::quiet_NaN());
  const int64_t rows = stats.numel() / (channels * 6);  // channels >= 1: checked above
  if (rows == 0) return out;

  const double* in = stats.const_data_ptr<double>();
  double* result = out.data_ptr<double>();
  const bool has_range = psnr_range.has_value();
  const double range = has_range ? *psnr_range : 0.0;
  // About 30 operations per channel: a task of at least ~16k channels is worth a thread.
  const int64_t grain = std::max<int64_t>(1, 16384 / channels);
  parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const double* row_stats = in + row * channels * 6;
      double* row_out = result + row * layers * kScoreCount;
      for (int64_t layer = 0; layer < layers; ++layer) {
        ChannelSums sums;
        for (int64_t c = starts[layer]; c < starts[layer + 1]; ++c) sums.add(row_stats + c * 6);
        scores_from_sums(sums, starts[layer + 1] - starts[layer], has_range, range,
                         row_out + layer * kScoreCount);
      }
    }
  });
  return out;
}

}  // namespace
}  // namespace equifast

TORCH_LIBRARY_IMPL(equifast, CPU, m) {
  m.impl("score_stats", &equifast::score_stats_cpu);
}
