#include "gpu/cpu/host_allocator.hpp"

#include <cstdlib>
#include <new>

namespace troupe {

namespace {

// The size class of `bytes`: the next of 2^k * {1, 1.25, 1.5, 1.75}, at least a page.
std::size_t size_class(std::size_t bytes) {
  std::size_t c = 4096;
  while (c < bytes) {
    const std::size_t quarter = c / 4;
    if (c + quarter >= bytes) return c + quarter;
    if (c + 2 * quarter >= bytes) return c + 2 * quarter;
    if (c + 3 * quarter >= bytes) return c + 3 * quarter;
    c *= 2;
  }
  return c;
}

}  // namespace

host_allocator::~host_allocator() {
  for (auto& [size, blocks] : free_)
    for (void* p : blocks) std::free(p);
}

tensor host_allocator::empty(shape_t shape, dtype type) {
  std::size_t n = dtype_size(type);
  for (auto d : shape) n *= static_cast<std::size_t>(d);
  const std::size_t bytes = size_class(n);
  void* p = nullptr;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = free_.find(bytes);
    if (it != free_.end() && !it->second.empty()) {
      p = it->second.back();
      it->second.pop_back();
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
  auto& blocks = free_[bytes];
  if (cached_ + bytes > max_cached_ || blocks.size() >= max_per_class_) {
    std::free(p);
    return;
  }
  blocks.push_back(p);
  cached_ += bytes;
}

}  // namespace troupe
