// Splitting one FFI call over XLA's intra-op thread pool.
//
// A call's work is cut into items that the calling thread and helpers on the
// pool claim in order from a shared counter. The caller never waits for an
// item that nobody has claimed, so a call cannot deadlock when the pool is
// busy or has no free thread: a helper that starts late finds no work and
// returns.
#ifndef SRIGL_COMMON_WORK_H_
#define SRIGL_COMMON_WORK_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace srigl {

// Returns once counter >= target.
inline void SpinUntil(const std::atomic<int64_t>& counter, int64_t target) {
  for (int spins = 0; counter.load(std::memory_order_acquire) < target;
       ++spins) {
    if (spins > 256) std::this_thread::yield();
  }
}

// Items [0, items) and the counters the threads of one call share.
class WorkQueue {
 public:
  int64_t items = 1;

  // Runs fn(i) on every item i this thread claims, until none are left.
  template <typename Fn>
  void Drain(Fn&& fn) {
    for (int64_t i = next_.fetch_add(1); i < items; i = next_.fetch_add(1)) {
      fn(i);
      done_.fetch_add(1, std::memory_order_release);
    }
  }

  // Waits for the items other threads have claimed but not finished.
  void WaitAll() const { SpinUntil(done_, items); }

 private:
  std::atomic<int64_t> next_{0};
  std::atomic<int64_t> done_{0};
};

// Threads a call may use: the pool's, capped by the max_threads attribute
// when it is positive.
inline int64_t ThreadBudget(const xla::ffi::ThreadPool& pool,
                            int64_t max_threads) {
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  if (max_threads > 0) threads = std::min(threads, max_threads);
  return threads;
}

// Runs job->Work() (which drains job->queue) on the calling thread and on
// up to threads - 1 helpers from the pool, and returns when every item is
// done. The helpers share ownership of the job because one may start only
// after the call has returned.
template <typename Job>
void RunOnPool(xla::ffi::ThreadPool& pool, int64_t threads,
               const std::shared_ptr<Job>& job) {
  const int64_t helpers = std::min(threads, job->queue.items) - 1;
  for (int64_t h = 0; h < helpers; ++h) {
    pool.Schedule([job]() { job->Work(); });
  }
  job->Work();
  job->queue.WaitAll();
}

}  // namespace srigl

#endif  // SRIGL_COMMON_WORK_H_
