// ParallelFor and ParallelChunks: work split into chunks run on XLA's intra-op
// thread pool *and* the calling thread, which claim chunks from a shared
// counter (shared by the kernels of native/bilinear.cc and
// native/convolution.cc). The caller never waits for work that has not
// started: it runs every unclaimed chunk itself and then waits only for chunks
// that other threads are running. This matters because XLA runs the programs
// of several CPU devices (pmap, forced host devices) on that same pool: a
// kernel that blocked until its scheduled tasks ran would deadlock once every
// pool thread is such a kernel.

#ifndef STN_JAX_NATIVE_PARALLEL_H_
#define STN_JAX_NATIVE_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace stn_jax_native {

namespace ffi = xla::ffi;

// Shared by the calling thread and the pool tasks of one ParallelChunks; owned
// jointly, so that a task the pool starts after the caller returned finds
// nothing left to claim and exits without touching the caller's frame.
struct ParallelState {
  std::atomic<int64_t> next{0};      // the next unclaimed chunk
  std::atomic<int64_t> finished{0};  // chunks completed
  int64_t chunks = 0;
  const std::function<void(int64_t)>* run_chunk = nullptr;  // valid while chunks remain
  std::mutex mutex;
  std::condition_variable done;
};

inline void RunChunks(ParallelState& s) {
  for (int64_t k = s.next.fetch_add(1); k < s.chunks; k = s.next.fetch_add(1)) {
    (*s.run_chunk)(k);
    if (s.finished.fetch_add(1) + 1 == s.chunks) {
      std::lock_guard<std::mutex> lock(s.mutex);
      s.done.notify_all();
    }
  }
}

// Runs body(k) for every chunk k in [0, chunks), on the calling thread and on
// idle threads of XLA's intra-op pool. Safe when every pool thread is busy (or
// is itself inside a ParallelChunks): see the top.
template <typename F>
void ParallelChunks(ffi::ThreadPool& pool, int64_t chunks, F&& body) {
  const int64_t threads = std::max<int64_t>(0, pool.num_threads());
  if (chunks <= 1 || threads == 0) {
    for (int64_t k = 0; k < chunks; ++k) body(k);
    return;
  }
  const std::function<void(int64_t)> run_chunk = [&](int64_t k) { body(k); };
  auto state = std::make_shared<ParallelState>();
  state->chunks = chunks;
  state->run_chunk = &run_chunk;
  for (int64_t t = 0; t < std::min(threads, chunks - 1); ++t) {
    pool.Schedule([state] { RunChunks(*state); });
  }
  RunChunks(*state);
  std::unique_lock<std::mutex> lock(state->mutex);
  state->done.wait(lock, [&] { return state->finished.load() == chunks; });
}

// The number of chunks for `count` items of `work_per_item` each: a few per
// thread, so that the threads that are free take over the share of those that
// are busy with other work (with one chunk per thread, a pool of n threads plus
// the caller on n cores finishes in two rounds); fewer for small jobs.
inline int64_t ChunkCount(ffi::ThreadPool& pool, int64_t count, int64_t work_per_item) {
  const int64_t threads = std::max<int64_t>(0, pool.num_threads());
  const int64_t by_work = std::max<int64_t>(1, count * work_per_item / (1 << 13));
  return std::max<int64_t>(1, std::min({count, 4 * (threads + 1), by_work}));
}

// Runs body(i) for i in [0, count) in contiguous chunks (see ChunkCount).
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t count, int64_t work_per_item, F&& body) {
  const int64_t chunks = ChunkCount(pool, count, work_per_item);
  ParallelChunks(pool, chunks, [&](int64_t k) {
    for (int64_t i = k * count / chunks; i < (k + 1) * count / chunks; ++i) body(i);
  });
}

}  // namespace stn_jax_native

#endif  // STN_JAX_NATIVE_PARALLEL_H_
