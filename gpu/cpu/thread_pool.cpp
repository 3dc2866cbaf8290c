#include "gpu/cpu/thread_pool.hpp"

namespace troupe {

thread_pool::thread_pool(int num_threads) {
  for (int i = 1; i < num_threads; ++i) workers_.emplace_back([this, i] { work(i); });
}

thread_pool::~thread_pool() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  wake_.notify_all();
  for (auto& t : workers_) t.join();
}

void thread_pool::parallel_for(std::int64_t n, const std::function<void(std::int64_t, std::int64_t)>& fn) {
  const int parts = size();
  // One parallel region at a time: a caller that finds the pool busy (another actor's op on
  // another thread) runs its work inline rather than waiting.
  std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
  if (parts == 1 || n < 2 || !busy.owns_lock()) {
    fn(0, n);
    return;
  }
  {
    std::lock_guard<std::mutex> lock(mutex_);
    task_ = &fn;
    task_size_ = n;
    pending_ = parts - 1;
    ++generation_;
  }
  wake_.notify_all();
  fn(0, n / parts);  // the caller takes the first range
  std::unique_lock<std::mutex> lock(mutex_);
  done_.wait(lock, [this] { return pending_ == 0; });
  task_ = nullptr;
}

void thread_pool::work(int index) {
  std::uint64_t seen = 0;
  for (;;) {
    const std::function<void(std::int64_t, std::int64_t)>* task;
    std::int64_t n;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      task = task_;
      n = task_size_;
    }
    const int parts = size();
    (*task)(n * index / parts, n * (index + 1) / parts);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (--pending_ == 0) done_.notify_one();
    }
  }
}

}  // namespace troupe
