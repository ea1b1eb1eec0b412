// equifast::parallel_for: at::parallel_for that also runs in parallel when this file is compiled
// without OpenMP (host code only).
//
// Why: at::parallel_for is a header template whose OpenMP backend is `#pragma omp parallel`. A
// torch extension compiled without -fopenmp (cpp_extension does not add it) silently runs it on
// one thread. Without _OPENMP, this version splits the range into at most at::get_num_threads()
// chunks, hands chunks to torch's inter-op thread pool (at::launch) and has the calling thread
// claim chunks too. Chunks are claimed from an atomic counter, so the caller never waits for a
// chunk that no thread has started (no deadlock when called from a pool thread), and a pool task
// that starts late finds nothing left and touches nothing of the caller's.
//
// Compiling with -fopenmp is better still (measured on 2 cores: up to 2x on small calls): after
// any torch op, torch's OpenMP workers spin for a while before they sleep, and the inter-op
// threads used here then compete with them for the cores; with OpenMP this op runs on that very
// team.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>

namespace equifast {

template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain_size, const F& f) {
  if (begin >= end) return;
#ifdef _OPENMP
  at::parallel_for(begin, end, grain_size, f);
#else
  const int64_t range = end - begin;
  const int64_t grain = std::max<int64_t>(grain_size, 1);
  const int64_t chunks =
      std::min<int64_t>(at::get_num_threads(), (range + grain - 1) / grain);
  if (chunks <= 1 || at::in_parallel_region()) {
    f(begin, end);
    return;
  }
  const int64_t chunk_size = (range + chunks - 1) / chunks;

  struct State {
    std::atomic<int64_t> next{0};  // next chunk to claim
    int64_t finished = 0;          // chunks done (under mutex)
    std::mutex mutex;
    std::condition_variable all_done;
    std::exception_ptr error;
  };
  auto state = std::make_shared<State>();
  const F* body = &f;  // only dereferenced by a thread that claimed a chunk (the caller waits)
  auto run_chunks = [state, body, begin, end, chunks, chunk_size]() {
    for (;;) {
      const int64_t chunk = state->next.fetch_add(1);
      if (chunk >= chunks) return;
      const int64_t lo = begin + chunk * chunk_size;
      const int64_t hi = std::min(end, lo + chunk_size);
      std::exception_ptr error;
      if (lo < hi) {
        try {
          (*body)(lo, hi);
        } catch (...) {
          error = std::current_exception();
        }
      }
      std::lock_guard<std::mutex> lock(state->mutex);
      if (error && !state->error) state->error = error;
      if (++state->finished == chunks) state->all_done.notify_all();
    }
  };
  for (int64_t i = 1; i < chunks; ++i) at::launch(run_chunks);
  run_chunks();
  std::unique_lock<std::mutex> lock(state->mutex);
  state->all_done.wait(lock, [&] { return state->finished == chunks; });
  if (state->error) std::rethrow_exception(state->error);
#endif
}

}  // namespace equifast
