// A caching allocator for the CPU backend's activation buffers: freed blocks are kept per size
// class and reused, so a decode step does not pay mmap, page faults and zeroing for every op
// (glibc serves large blocks with mmap). Sizes are rounded up to four classes per power of two
// (at most 19% slack), so the shapes of changing batches map to few classes and the cache
// stops growing once each class holds what a step needs.
// Invariant: a block is handed out to one tensor at a time; the cache holds at most
// `max_blocks_per_class` blocks per class and `max_cached_bytes` in all.
#pragma once

#include <cstddef>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "gpu/tensor.hpp"

namespace troupe {

class host_allocator : public std::enable_shared_from_this<host_allocator> {
 public:
  explicit host_allocator(std::size_t max_cached_bytes = std::size_t(512) << 20, std::size_t max_blocks_per_class = 8)
      : max_cached_(max_cached_bytes), max_per_class_(max_blocks_per_class) {}
  ~host_allocator();

  /// An uninitialised 64-byte-aligned host tensor whose storage returns here when released.
  tensor empty(shape_t shape, dtype type);

 private:
  void release(void* p, std::size_t bytes);

  std::mutex mutex_;
  std::map<std::size_t, std::vector<void*>> free_;  // size class -> blocks
  std::size_t cached_ = 0, max_cached_, max_per_class_;
};

}  // namespace troupe
