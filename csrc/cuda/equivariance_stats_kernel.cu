// equivariance_stats on CUDA: argument checks, the launch, and the registration. The kernel
// (equivariance_stats_kernel.cuh) has the same contract and the same math as
// csrc/cpu/equivariance_stats_kernel.cpp: the index arithmetic is affine.h (the sampling rules of
// _reference._sample_plan), the statistics moments.h.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <string_view>
#include <vector>

#include "equifast/checks.h"
#include "equivariance_stats_kernel.cuh"

namespace equifast {
namespace {

at::Tensor equivariance_stats_cuda(const at::Tensor& feats, const at::Tensor& source_affines,
                                   c10::IntArrayRef wrap, int64_t batch, c10::string_view layout,
                                   int64_t grid_h, int64_t grid_w, int64_t prefix,
                                   c10::string_view subpixel, bool with_inv, bool with_chance,
                                   const std::optional<at::Tensor>& reference,
                                   std::optional<c10::ArrayRef<double>> disc) {
  const StatsProblem problem = check_stats_args(
      feats, source_affines, wrap, batch, std::string_view(layout.data(), layout.size()), grid_h,
      grid_w, prefix, std::string_view(subpixel.data(), subpixel.size()), reference, disc);
  check_device_cuda(feats, "feats");
  const c10::cuda::CUDAGuard device_guard(feats.device());
  const FeatureView& view = problem.view;
  at::Tensor stats = at::zeros({kComparisons, problem.elements, batch, view.channels, 6},
                               feats.options().dtype(at::kDouble));
  if (problem.elements == 0 || view.channels == 0) return stats;
  TORCH_CHECK(grid_h * grid_w < (int64_t{1} << 31), "equifast: equivariance_stats on CUDA "
              "supports grids of fewer than 2^31 positions, but got ", grid_h, " x ", grid_w, ".");

  // Per element: the map, its number of valid positions and the first one (host), ordered by
  // path; elements without a valid position are left out (their statistics stay 0).
  const std::vector<DeviceElement> elements = make_device_elements(problem);
  if (elements.empty()) return stats;
  const int64_t bytes = static_cast<int64_t>(elements.size() * sizeof(DeviceElement));
  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), elements.data(), bytes);
  const at::Tensor device_elements = host.to(feats.device(), /*non_blocking=*/true);

  const StatsLaunch launch = make_stats_launch(problem, with_inv, with_chance);
  TORCH_CHECK(launch.blocks_y <= 65535 && launch.blocks_z <= 65535 &&
                  launch.blocks_x <= std::numeric_limits<int32_t>::max(),
              "equifast: equivariance_stats on CUDA supports at most 65535 images per block, ",
              "65535 channel tiles (", launch.channels_inner ? 32 : kWarps, " channels each) and ",
              "2^31 - 1 elements, but got batch ", batch, ", ", view.channels, " channels and ",
              problem.elements, " elements. Split the call.");
  const std::vector<PathLaunch> runs = path_launches(elements);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto* elements_ptr = reinterpret_cast<const DeviceElement*>(device_elements.data_ptr());
  double* out = stats.data_ptr<double>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats.scalar_type(),
                                  "equivariance_stats_cuda", [&] {
    const scalar_t* base = feats.const_data_ptr<scalar_t>() + view.offset;
    const scalar_t* identity =
        problem.separate_identity ? reference->const_data_ptr<scalar_t>() + view.offset : base;
    const scalar_t* element_blocks = base + problem.element_start * view.stride_n;
    const auto launcher = [&](const PathLaunch& run, auto kernel) {
      const dim3 blocks(static_cast<unsigned>(run.count), static_cast<unsigned>(launch.blocks_y),
                        static_cast<unsigned>(launch.blocks_z));
      kernel<<<blocks, kThreads, 0, stream>>>(identity, element_blocks, elements_ptr + run.start,
                                              launch.params, out);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (launch.channels_inner) {
      launch_stats_kernels<true, scalar_t>(runs, launcher);
    } else {
      launch_stats_kernels<false, scalar_t>(runs, launcher);
    }
  });
  return stats;
}

}  // namespace
}  // namespace equifast

TORCH_LIBRARY_IMPL(equifast, CUDA, m) {
  m.impl("equivariance_stats", &equifast::equivariance_stats_cuda);
}
