#include "gpu/cpu/host_allocator.hpp"

#include <cstdlib>
#include <new>

namespace troupe {

host_allocator::~host_allocator() {
  for (auto& [size, p] : free_) std::free(p);
}

tensor host_allocator::empty(shape_t shape, dtype type) {
  std::size_t n = dtype_size(type);
  for (auto d : shape) n *= static_cast<std::size_t>(d);
  const std::size_t bytes = ((n + 4095) / 4096) * 4096;  // page granularity: sizes repeat step to step
  void* p = nullptr;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = free_.find(bytes);
    if (it != free_.end()) {
      p = it->second;
      free_.erase(it);
      cached_ -= bytes;
    }
  }
  if (!p) {
    p = std::aligned_alloc(64, bytes);
    if (!p) throw std::bad_alloc();
  }
  std::weak_ptr<host_allocator> home = weak_from_this();
  std::shared_ptr<void> owner(p, [home, bytes](void* q) {
    if (auto a = home.lock()) a->release(q, bytes);
    else std::free(q);
  });
  return tensor::view(std::move(owner), p, std::move(shape), type);
}

void host_allocator::release(void* p, std::size_t bytes) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (cached_ + bytes > max_cached_) {
    std::free(p);
    return;
  }
  free_.emplace(bytes, p);
  cached_ += bytes;
}

}  // namespace troupe
