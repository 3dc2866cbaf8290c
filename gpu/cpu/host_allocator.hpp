// A caching allocator for the CPU backend's activation buffers: freed blocks are kept per size
// and reused, so a decode step does not pay mmap, page faults and zeroing for every op (glibc
// serves large blocks with mmap). Invariant: a block is handed out to one tensor at a time,
// and the cache never holds more than `max_cached_bytes`.
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
  explicit host_allocator(std::size_t max_cached_bytes = std::size_t(1) << 30) : max_cached_(max_cached_bytes) {}
  ~host_allocator();

  /// An uninitialised 64-byte-aligned host tensor whose storage returns here when released.
  tensor empty(shape_t shape, dtype type);

 private:
  void release(void* p, std::size_t bytes);

  std::mutex mutex_;
  std::multimap<std::size_t, void*> free_;  // size -> blocks
  std::size_t cached_ = 0, max_cached_;
};

}  // namespace troupe
