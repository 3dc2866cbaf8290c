// A small n-dimensional tensor: shape, element type, device and a shared handle on its
// storage. Invariant: a tensor never owns less than shape x dtype bytes starting at data(),
// and views (reshape, row ranges, memory-mapped checkpoint slices) keep their storage alive
// through the shared owner, so handing a tensor to another actor in the same process is a
// reference-count bump, never a copy.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "gpu/dtype.hpp"

namespace troupe {

enum class device_kind : std::uint8_t { cpu, cuda };

struct device {
  device_kind kind = device_kind::cpu;
  int index = 0;
  friend bool operator==(const device&, const device&) = default;
};

using shape_t = std::vector<std::int64_t>;

std::string shape_to_string(const shape_t& shape);

class tensor {
 public:
  tensor() = default;

  /// Uninitialised host tensor, 64-byte aligned.
  static tensor empty(shape_t shape, dtype type);
  /// Zero-filled host tensor.
  static tensor zeros(shape_t shape, dtype type);
  /// A view on memory kept alive by `owner` (a mapped file, a device allocation, ...).
  static tensor view(std::shared_ptr<void> owner, void* data, shape_t shape, dtype type,
                     device where = {});

  bool defined() const { return data_ != nullptr; }
  dtype type() const { return type_; }
  const device& where() const { return device_; }
  const shape_t& shape() const { return shape_; }
  int rank() const { return static_cast<int>(shape_.size()); }
  /// Size of dimension `i`; negative `i` counts from the back.
  std::int64_t dim(int i) const { return shape_.at(i < 0 ? shape_.size() + i : i); }
  std::int64_t numel() const;
  std::size_t nbytes() const { return static_cast<std::size_t>(numel()) * dtype_size(type_); }

  void* raw() const { return data_; }
  /// Typed pointer; throws if T does not match the element type.
  template <class T>
  T* data() const {
    check_type(sizeof(T), type_matches<T>());
    return static_cast<T*>(data_);
  }

  /// Same storage, new shape with the same number of elements.
  tensor reshape(shape_t shape) const;
  /// Rows [begin, end) of the first dimension, sharing storage.
  tensor rows(std::int64_t begin, std::int64_t end) const;
  /// A float32 host copy (converting bf16/f16); f32 host tensors are returned as they are.
  tensor to_f32() const;

 private:
  template <class T>
  bool type_matches() const;
  void check_type(std::size_t elem_size, bool matches) const;

  std::shared_ptr<void> owner_;
  void* data_ = nullptr;
  shape_t shape_;
  dtype type_ = dtype::f32;
  device device_;
};

template <> inline bool tensor::type_matches<float>() const { return type_ == dtype::f32; }
template <> inline bool tensor::type_matches<std::int32_t>() const { return type_ == dtype::i32; }
template <> inline bool tensor::type_matches<std::int64_t>() const { return type_ == dtype::i64; }
template <> inline bool tensor::type_matches<std::uint16_t>() const {
  return type_ == dtype::bf16 || type_ == dtype::f16;
}
template <> inline bool tensor::type_matches<const float>() const { return type_ == dtype::f32; }
template <> inline bool tensor::type_matches<const std::uint16_t>() const {
  return type_ == dtype::bf16 || type_ == dtype::f16;
}

}  // namespace troupe
