// A fixed pool of worker threads for the CPU backend's own kernels (OpenBLAS has its own).
// Invariant: parallel_for returns only after every chunk ran; chunks never overlap, so each
// output element is written by exactly one thread and results do not depend on scheduling.
// Safe to call from several threads (actors): one caller at a time gets the workers.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace troupe {

class thread_pool {
 public:
  /// `num_threads` includes the calling thread; 1 runs everything inline.
  explicit thread_pool(int num_threads);
  ~thread_pool();
  thread_pool(const thread_pool&) = delete;
  thread_pool& operator=(const thread_pool&) = delete;

  int size() const { return static_cast<int>(workers_.size()) + 1; }
  /// Calls fn(begin, end) over [0, n) split into one contiguous range per thread.
  void parallel_for(std::int64_t n, const std::function<void(std::int64_t, std::int64_t)>& fn);

 private:
  void work(int index);

  std::vector<std::thread> workers_;
  std::mutex busy_;  // held by the thread whose parallel_for owns the workers
  std::mutex mutex_;
  std::condition_variable wake_, done_;
  const std::function<void(std::int64_t, std::int64_t)>* task_ = nullptr;
  std::int64_t task_size_ = 0;
  std::uint64_t generation_ = 0;
  int pending_ = 0;
  bool stop_ = false;
};

}  // namespace troupe
