// The CUDA kernel of equivariance_stats (csrc/cuda/equivariance_stats_kernel.cuh) compiled for the
// host under a small emulation of the CUDA execution model, so that its index arithmetic, its
// work split over lanes, warps and tiles and its merges can be checked without a GPU
// (tests/test_cuda_emulation.py).
//
// Emulation:
//   - Blocks run one at a time over the launch grid, x fastest, as the CUDA launcher's grid
//     (K, channel tiles, B) describes it; `__shared__` variables are function statics.
//   - The kThreads threads of a block are cooperative fibers (ucontext) on the calling thread, run
//     round-robin between barriers: each runs until it reaches __syncthreads(), a warp shuffle or
//     its end; when every live thread is waiting, the scheduler releases them (fibers rather than
//     std::threads: 256 OS threads per block meeting at ~55 barriers made the suite minutes long
//     on two cores; fibers make a block cost milliseconds, and runs are deterministic).
//   - __syncthreads() waits for all threads that have not exited (as on Volta and later).
//     __shfl_xor_sync(mask, v, offset) is an exchange at a warp-wide meeting point: the scheduler
//     checks that all 32 lanes of every warp that reached it are there (full mask required, same
//     offset), then hands each lane the value of lane ^ offset. Any other mix of waits (threads at
//     different kinds of barriers, a shuffle with an exited lane) is reported as an error.
#include <torch/extension.h>

#include <ucontext.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <mutex>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

// ---------------------------------------------------------------------------------------------
// Host stand-ins for the CUDA language extensions the kernel uses.

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// One emulated launch at a time (the __shared__ statics are global), on one OS thread: plain
// thread_locals hold the index of the fiber that runs.
thread_local uint3 blockIdx{0, 0, 0};
thread_local uint3 threadIdx{0, 0, 0};
thread_local dim3 blockDim{1, 1, 1};
thread_local dim3 gridDim{1, 1, 1};

namespace emu {

enum class Wait { kRunnable, kSync, kShuffle, kDone };

struct Fiber {
  ucontext_t context;
  std::vector<char> stack;
  Wait wait = Wait::kRunnable;
  unsigned mask = 0;
  int offset = 0;
  double value = 0;   // the lane's contribution to a shuffle
  double result = 0;  // what the shuffle hands back
};

constexpr size_t kStackBytes = 64 * 1024;

struct Block {
  ucontext_t scheduler;
  std::vector<Fiber> fibers;
  std::function<void()> body;
  int current = -1;
  std::string error;
};

thread_local Block* g_block = nullptr;

inline void yield_to_scheduler() {
  Fiber& fiber = g_block->fibers[g_block->current];
  swapcontext(&fiber.context, &g_block->scheduler);
}

void fiber_entry() {
  Block* block = g_block;
  try {
    block->body();
  } catch (const std::exception& e) {
    if (block->error.empty()) block->error = std::string("exception in a thread: ") + e.what();
  } catch (...) {
    if (block->error.empty()) block->error = "unknown exception in a thread";
  }
  block->fibers[block->current].wait = Wait::kDone;
  // Returning resumes uc_link (the scheduler).
}

// Runs one block of `threads` threads through `body` (which reads threadIdx); throws on an
// inconsistent use of the barriers.
inline void run_block(Block& block, int threads) {
  if (static_cast<int>(block.fibers.size()) < threads) block.fibers.resize(threads);
  for (int t = 0; t < threads; ++t) {
    Fiber& fiber = block.fibers[t];
    if (fiber.stack.empty()) fiber.stack.resize(kStackBytes);
    getcontext(&fiber.context);
    fiber.context.uc_stack.ss_sp = fiber.stack.data();
    fiber.context.uc_stack.ss_size = fiber.stack.size();
    fiber.context.uc_link = &block.scheduler;
    makecontext(&fiber.context, fiber_entry, 0);
    fiber.wait = Wait::kRunnable;
  }
  g_block = &block;
  for (int phase = 0;; ++phase) {
    for (int t = 0; t < threads; ++t) {
      Fiber& fiber = block.fibers[t];
      if (fiber.wait == Wait::kDone) continue;
      fiber.wait = Wait::kRunnable;
      block.current = t;
      threadIdx = uint3{static_cast<unsigned>(t), 0, 0};
      swapcontext(&block.scheduler, &fiber.context);
      if (!block.error.empty()) throw std::runtime_error(block.error);
    }
    int sync = 0, shuffle = 0, done = 0;
    for (int t = 0; t < threads; ++t) {
      switch (block.fibers[t].wait) {
        case Wait::kSync: ++sync; break;
        case Wait::kShuffle: ++shuffle; break;
        case Wait::kDone: ++done; break;
        default: throw std::runtime_error("emulation: a thread neither waits nor ended");
      }
    }
    if (done == threads) return;
    if (sync > 0 && shuffle > 0) {
      throw std::runtime_error("emulation: divergent barriers in phase " + std::to_string(phase) +
                               ": " + std::to_string(sync) + " threads at __syncthreads, " +
                               std::to_string(shuffle) + " at a warp shuffle");
    }
    if (shuffle > 0) {
      if (threads % 32 != 0) throw std::runtime_error("emulation: partial warp at a shuffle");
      for (int w = 0; w < threads / 32; ++w) {
        const Fiber& lane0 = block.fibers[w * 32];
        int waiting = 0;
        for (int l = 0; l < 32; ++l) waiting += block.fibers[w * 32 + l].wait == Wait::kShuffle;
        if (waiting == 0) continue;  // this warp has ended
        if (waiting != 32) {
          throw std::runtime_error("emulation: warp " + std::to_string(w) + " reached a shuffle " +
                                   "with " + std::to_string(waiting) + " of 32 lanes");
        }
        for (int l = 0; l < 32; ++l) {
          const Fiber& lane = block.fibers[w * 32 + l];
          if (lane.mask != 0xffffffffu || lane.offset != lane0.offset || lane.offset < 0 ||
              lane.offset >= 32) {
            throw std::runtime_error("emulation: warp " + std::to_string(w) +
                                     " shuffles with inconsistent masks or offsets");
          }
        }
        for (int l = 0; l < 32; ++l) {
          block.fibers[w * 32 + l].result = block.fibers[w * 32 + (l ^ lane0.offset)].value;
        }
      }
    }
  }
}

}  // namespace emu

inline void __syncthreads() {
  emu::g_block->fibers[emu::g_block->current].wait = emu::Wait::kSync;
  emu::yield_to_scheduler();
}

inline double __shfl_xor_sync(unsigned mask, double value, int offset) {
  emu::Fiber& fiber = emu::g_block->fibers[emu::g_block->current];
  fiber.wait = emu::Wait::kShuffle;
  fiber.mask = mask;
  fiber.offset = offset;
  fiber.value = value;
  emu::yield_to_scheduler();
  return fiber.result;
}

// ---------------------------------------------------------------------------------------------
// The kernel and its host helpers, as the CUDA build compiles them.

#include "equifast/checks.h"
#include "equivariance_stats_kernel.cuh"

namespace {

std::mutex g_launch_mutex;

// Runs kernel(…) over the launch grid, one block at a time, kThreads threads per block.
void emulate_launch(const dim3& blocks, int threads, const std::function<void()>& kernel) {
  emu::Block block;
  block.body = kernel;
  gridDim = blocks;
  blockDim = dim3(static_cast<unsigned>(threads));
  for (unsigned z = 0; z < blocks.z; ++z) {
    for (unsigned y = 0; y < blocks.y; ++y) {
      for (unsigned x = 0; x < blocks.x; ++x) {
        blockIdx = uint3{x, y, z};
        emu::run_block(block, threads);
      }
    }
  }
}

// The contract of equivariance_stats_cuda (csrc/cuda/equivariance_stats_kernel.cu) on CPU
// tensors: same checks, same host preparation, same launch shape, the kernel run emulated.
at::Tensor emulated_equivariance_stats(const at::Tensor& feats, const at::Tensor& source_affines,
                                       std::vector<int64_t> wrap, int64_t batch,
                                       const std::string& layout, int64_t grid_h, int64_t grid_w,
                                       int64_t prefix, const std::string& subpixel, bool with_inv,
                                       bool with_chance,
                                       const std::optional<at::Tensor>& reference,
                                       const std::optional<std::vector<double>>& disc) {
  using namespace equifast;
  std::optional<c10::ArrayRef<double>> disc_ref;
  if (disc.has_value()) disc_ref = c10::ArrayRef<double>(*disc);
  const StatsProblem problem =
      check_stats_args(feats, source_affines, c10::IntArrayRef(wrap), batch,
                       std::string_view(layout), grid_h, grid_w, prefix,
                       std::string_view(subpixel), reference, disc_ref);
  check_device_cpu(feats, "feats");
  const FeatureView& view = problem.view;
  at::Tensor stats = at::zeros({kComparisons, problem.elements, batch, view.channels, 6},
                               feats.options().dtype(at::kDouble));
  if (problem.elements == 0 || view.channels == 0) return stats;
  TORCH_CHECK(grid_h * grid_w < (int64_t{1} << 31), "grid too large");

  const std::vector<DeviceElement> elements = make_device_elements(problem);
  const StatsLaunch launch = make_stats_launch(problem, with_inv, with_chance);
  TORCH_CHECK(launch.blocks_y <= 65535 && launch.blocks_z <= 65535 &&
                  launch.blocks_x <= std::numeric_limits<int32_t>::max(),
              "launch too large");
  const dim3 blocks(static_cast<unsigned>(launch.blocks_x), static_cast<unsigned>(launch.blocks_y),
                    static_cast<unsigned>(launch.blocks_z));
  const std::vector<PathLaunch> runs = path_launches(elements);
  const DeviceElement* elements_ptr = elements.data();
  double* out = stats.data_ptr<double>();

  const std::lock_guard<std::mutex> lock(g_launch_mutex);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats.scalar_type(),
                                  "emulated_equivariance_stats", [&] {
    const scalar_t* base = feats.const_data_ptr<scalar_t>() + view.offset;
    const scalar_t* identity =
        problem.separate_identity ? reference->const_data_ptr<scalar_t>() + view.offset : base;
    const scalar_t* element_blocks = base + problem.element_start * view.stride_n;
    const StatsParams params = launch.params;
    const auto launcher = [&](const PathLaunch& run, auto kernel) {
      const dim3 grid(static_cast<unsigned>(run.count), blocks.y, blocks.z);
      emulate_launch(grid, kThreads, [&] {
        kernel(identity, element_blocks, elements_ptr + run.start, params, out);
      });
    };
    if (launch.channels_inner) {
      launch_stats_kernels<true, scalar_t>(runs, launcher);
    } else {
      launch_stats_kernels<false, scalar_t>(runs, launcher);
    }
  });
  return stats;
}

// The launch shape the CUDA launcher would use: (channels_inner, blocks_x, blocks_y, blocks_z).
std::tuple<bool, int64_t, int64_t, int64_t> emulated_launch_shape(
    const at::Tensor& feats, const at::Tensor& source_affines, std::vector<int64_t> wrap,
    int64_t batch, const std::string& layout, int64_t grid_h, int64_t grid_w, int64_t prefix,
    const std::string& subpixel) {
  using namespace equifast;
  const StatsProblem problem =
      check_stats_args(feats, source_affines, c10::IntArrayRef(wrap), batch,
                       std::string_view(layout), grid_h, grid_w, prefix,
                       std::string_view(subpixel));
  const StatsLaunch launch = make_stats_launch(problem, true, true);
  return {launch.channels_inner, launch.blocks_x, launch.blocks_y, launch.blocks_z};
}


// The launches the CUDA launcher would make: (element k, path) in launch order (StatsPath:
// 0 rectangle, 1 other integer maps, 2 other bilinear maps, 3 bilinear rectangles; elements
// without a valid position left out).
std::vector<std::tuple<int64_t, int64_t>> emulated_element_paths(
    const at::Tensor& feats, const at::Tensor& source_affines, std::vector<int64_t> wrap,
    int64_t batch, const std::string& layout, int64_t grid_h, int64_t grid_w, int64_t prefix,
    const std::string& subpixel, const std::optional<std::vector<double>>& disc) {
  using namespace equifast;
  std::optional<c10::ArrayRef<double>> disc_ref;
  if (disc.has_value()) disc_ref = c10::ArrayRef<double>(*disc);
  const StatsProblem problem =
      check_stats_args(feats, source_affines, c10::IntArrayRef(wrap), batch,
                       std::string_view(layout), grid_h, grid_w, prefix,
                       std::string_view(subpixel), std::nullopt, disc_ref);
  std::vector<std::tuple<int64_t, int64_t>> paths;
  for (const DeviceElement& element : make_device_elements(problem)) {
    paths.emplace_back(element.index, element.path);
  }
  return paths;
}

// rectangle_offsets_fit_32_bits for a rectangle and strides given as numbers (features of such
// strides would not fit in memory).
bool emulated_rectangle_fits(int64_t stride_x, int64_t stride_y, int64_t rect_x0, int64_t rect_y0,
                             int64_t rect_w, int64_t rect_h, int64_t from_dx, int64_t from_dy,
                             int64_t from_0) {
  using namespace equifast;
  DeviceElement element{};
  element.rect_x0 = rect_x0;
  element.rect_y0 = rect_y0;
  element.rect_w = rect_w;
  element.rect_h = rect_h;
  element.from_dx = from_dx;
  element.from_dy = from_dy;
  element.from_0 = from_0;
  FeatureView view;
  view.stride_x = stride_x;
  view.stride_y = stride_y;
  return rectangle_offsets_fit_32_bits(element, view);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("emulated_equivariance_stats", &emulated_equivariance_stats,
        "equivariance_stats through the CUDA kernel, emulated on the host", py::arg("feats"),
        py::arg("source_affines"), py::arg("wrap"), py::arg("batch"), py::arg("layout"),
        py::arg("grid_h"), py::arg("grid_w"), py::arg("prefix"), py::arg("subpixel"),
        py::arg("with_inv"), py::arg("with_chance"), py::arg("reference") = py::none(),
        py::arg("disc") = py::none());
  m.def("emulated_launch_shape", &emulated_launch_shape,
        "(channels_inner, blocks_x, blocks_y, blocks_z) of the CUDA launch");
  m.def("emulated_element_paths", &emulated_element_paths,
        "(element, path) of the CUDA launches, in launch order", py::arg("feats"),
        py::arg("source_affines"), py::arg("wrap"), py::arg("batch"), py::arg("layout"),
        py::arg("grid_h"), py::arg("grid_w"), py::arg("prefix"), py::arg("subpixel"),
        py::arg("disc") = py::none());
  m.def("emulated_rectangle_fits", &emulated_rectangle_fits,
        "whether the rectangle loop's offsets fit in 32 bits");
}
