// transform_images on CUDA: argument checks, the launch, and the registration. The kernel
// (transform_images_kernel.cuh) has the same contract and math as
// csrc/cpu/transform_images_kernel.cpp (sampling rules: affine.h): B sources x E source maps ->
// (E * B, 3, out_h, out_w) normalized images, element-major, in the model's dtype and memory
// format.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "equifast/checks.h"
#include "equifast/poison.h"
#include "transform_images_kernel.cuh"

namespace equifast {
namespace {

at::Tensor transform_images_cuda(const at::Tensor& src, const at::Tensor& source_affines,
                                 c10::IntArrayRef protocols, int64_t margin_y, int64_t margin_x,
                                 int64_t out_h, int64_t out_w,
                                 std::optional<c10::ArrayRef<double>> mean,
                                 std::optional<c10::ArrayRef<double>> std,
                                 c10::ScalarType out_dtype, bool channels_last) {
  const TransformProblem problem = check_transform_args(
      src, source_affines, protocols, margin_y, margin_x, out_h, out_w, mean, std, out_dtype);
  check_device_cuda(src, "src");
  const c10::cuda::CUDAGuard device_guard(src.device());
  const int64_t elements = static_cast<int64_t>(problem.elements.size());
  at::Tensor out = at::empty({elements * problem.batch, problem.channels, out_h, out_w},
                             src.options().dtype(out_dtype),
                             channels_last ? at::MemoryFormat::ChannelsLast
                                           : at::MemoryFormat::Contiguous);
  if (out.numel() == 0) return out;
  if (poison_outputs()) out.fill_(std::numeric_limits<double>::quiet_NaN());  // tests
  TORCH_CHECK(elements <= 65535, "equifast: transform_images on CUDA supports at most 65535 "
              "elements, but got ", elements, ". Split the call.");

  const int64_t src_strides[4] = {src.stride(0), src.stride(1), src.stride(2), src.stride(3)};
  const int64_t out_strides[4] = {out.stride(0), out.stride(1), out.stride(2), out.stride(3)};
  const TransformParams params = make_transform_params(problem, src_strides, out_strides);

  // The elements and the uint8 table travel in one pinned buffer (one copy).
  const int64_t element_bytes = elements * static_cast<int64_t>(sizeof(TransformElement));
  const int64_t table_offset = (element_bytes + 15) / 16 * 16;
  const int64_t table_bytes = 3 * 256 * static_cast<int64_t>(sizeof(double));
  at::Tensor host = at::empty({table_offset + table_bytes},
                              at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  auto* host_bytes = static_cast<uint8_t*>(host.data_ptr());
  std::memcpy(host_bytes, problem.elements.data(), element_bytes);
  const bool wide = src.scalar_type() == at::kDouble || out_dtype == at::kDouble;
  fill_uint8_table(problem, wide, host_bytes + table_offset);
  const at::Tensor device_buffer = host.to(src.device(), /*non_blocking=*/true);
  const auto* device_bytes = static_cast<const uint8_t*>(device_buffer.data_ptr());
  const auto* elements_ptr = reinterpret_cast<const TransformElement*>(device_bytes);

  const dim3 threads(kBlockX, kBlockY);
  const dim3 blocks(static_cast<unsigned>((out_w + kBlockX - 1) / kBlockX),
                    static_cast<unsigned>((out_h + kBlockY - 1) / kBlockY),
                    static_cast<unsigned>(elements));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kByte, src.scalar_type(),
                                  "transform_images_cuda", [&] {
    using src_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype,
                                    "transform_images_cuda_out", [&] {
      using out_t = scalar_t;
      // float64 arithmetic when either side is float64, float32 otherwise (as on the CPU).
      constexpr bool kWide = std::is_same_v<src_t, double> || std::is_same_v<out_t, double>;
      using acc_t = std::conditional_t<kWide, double, float>;
      const auto* table = reinterpret_cast<const acc_t*>(device_bytes + table_offset);
      transform_kernel<src_t, out_t, acc_t><<<blocks, threads, 0, stream>>>(
          src.const_data_ptr<src_t>(), elements_ptr, table, params, out.data_ptr<out_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

}  // namespace
}  // namespace equifast

TORCH_LIBRARY_IMPL(equifast, CUDA, m) {
  m.impl("transform_images", &equifast::transform_images_cuda);
}
