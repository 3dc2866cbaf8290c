// Device arrays of the GPU training stage (training/cuda/cuda_stage.cpp).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <span>
#include <vector>

#include "gpu/cuda/cuda_check.hpp"

namespace troupe::train {

// A stream-ordered device array: allocated and freed on the stage's stream, so freeing one
// whose last use is still queued is safe and the pool reuses the memory without a sync.
template <class T>
class device_array {
 public:
  device_array() = default;
  device_array(std::int64_t n, cudaStream_t s) : n_(n), s_(s) {
    if (n > 0) TROUPE_CUDA_CHECK(cudaMallocAsync(reinterpret_cast<void**>(&p_), static_cast<std::size_t>(n) * sizeof(T), s));
  }
  static device_array zeros(std::int64_t n, cudaStream_t s) {
    device_array b(n, s);
    if (n > 0) TROUPE_CUDA_CHECK(cudaMemsetAsync(b.p_, 0, static_cast<std::size_t>(n) * sizeof(T), s));
    return b;
  }
  static device_array copy_of(const T* src, std::int64_t n, cudaStream_t s) {
    device_array b(n, s);
    if (n > 0) TROUPE_CUDA_CHECK(cudaMemcpyAsync(b.p_, src, static_cast<std::size_t>(n) * sizeof(T), cudaMemcpyDeviceToDevice, s));
    return b;
  }
  // From pageable host memory (every caller's vectors): cudaMemcpyAsync returns once it has
  // staged the bytes, so `host` may go as soon as this returns.
  static device_array upload(std::span<const T> host, cudaStream_t s) {
    device_array b(static_cast<std::int64_t>(host.size()), s);
    if (!host.empty()) TROUPE_CUDA_CHECK(cudaMemcpyAsync(b.p_, host.data(), host.size_bytes(), cudaMemcpyHostToDevice, s));
    return b;
  }
  device_array(device_array&& o) noexcept : p_(o.p_), n_(o.n_), s_(o.s_) { o.p_ = nullptr; }
  device_array& operator=(device_array&& o) noexcept {
    if (this != &o) {
      release();
      p_ = o.p_;
      n_ = o.n_;
      s_ = o.s_;
      o.p_ = nullptr;
    }
    return *this;
  }
  ~device_array() { release(); }

  T* get() const { return p_; }
  std::int64_t size() const { return n_; }
  std::vector<T> download() const {
    std::vector<T> out(static_cast<std::size_t>(n_));
    if (n_ > 0) {
      TROUPE_CUDA_CHECK(cudaMemcpyAsync(out.data(), p_, out.size() * sizeof(T), cudaMemcpyDeviceToHost, s_));
      TROUPE_CUDA_CHECK(cudaStreamSynchronize(s_));
    }
    return out;
  }

 private:
  void release() {
    if (p_) cudaFreeAsync(p_, s_);  // a destructor must not throw; a failed free leaks at worst
    p_ = nullptr;
  }
  T* p_ = nullptr;
  std::int64_t n_ = 0;
  cudaStream_t s_ = nullptr;
};
}  // namespace troupe::train
