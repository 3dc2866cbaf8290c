#include "gpu/tensor.hpp"

#include <cstdlib>
#include <cstring>
#include <new>
#include <sstream>
#include <stdexcept>

namespace troupe {

std::string shape_to_string(const shape_t& shape) {
  std::ostringstream out;
  out << '[';
  for (std::size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << ']';
  return out.str();
}

std::int64_t tensor::numel() const {
  std::int64_t n = 1;
  for (auto d : shape_) n *= d;
  return n;
}

tensor tensor::empty(shape_t shape, dtype type) {
  tensor t;
  t.shape_ = std::move(shape);
  t.type_ = type;
  for (auto d : t.shape_)
    if (d < 0) throw std::invalid_argument("tensor::empty: negative dimension in " + shape_to_string(t.shape_));
  const std::size_t bytes = ((t.nbytes() + 63) / 64) * 64;
  void* p = std::aligned_alloc(64, bytes ? bytes : 64);
  if (!p) throw std::bad_alloc();
  t.owner_ = std::shared_ptr<void>(p, [](void* q) { std::free(q); });
  t.data_ = p;
  return t;
}

tensor tensor::zeros(shape_t shape, dtype type) {
  tensor t = empty(std::move(shape), type);
  std::memset(t.data_, 0, t.nbytes());
  return t;
}

tensor tensor::view(std::shared_ptr<void> owner, void* data, shape_t shape, dtype type, device where) {
  tensor t;
  t.owner_ = std::move(owner);
  t.data_ = data;
  t.shape_ = std::move(shape);
  t.type_ = type;
  t.device_ = where;
  return t;
}

tensor tensor::reshape(shape_t shape) const {
  tensor t = *this;
  t.shape_ = std::move(shape);
  if (t.numel() != numel())
    throw std::invalid_argument("tensor::reshape: " + shape_to_string(shape_) + " has " + std::to_string(numel()) +
                                " elements, " + shape_to_string(t.shape_) + " has " + std::to_string(t.numel()));
  return t;
}

tensor tensor::rows(std::int64_t begin, std::int64_t end) const {
  if (shape_.empty() || begin < 0 || end < begin || end > shape_[0])
    throw std::out_of_range("tensor::rows: [" + std::to_string(begin) + ", " + std::to_string(end) +
                            ") outside " + shape_to_string(shape_));
  tensor t = *this;
  t.shape_[0] = end - begin;
  const std::size_t row_bytes = shape_[0] ? nbytes() / static_cast<std::size_t>(shape_[0]) : 0;
  t.data_ = static_cast<std::byte*>(data_) + static_cast<std::size_t>(begin) * row_bytes;
  return t;
}

tensor tensor::to_f32() const {
  if (device_.kind != device_kind::cpu) throw std::invalid_argument("tensor::to_f32: not a host tensor");
  if (type_ == dtype::f32) return *this;
  tensor out = empty(shape_, dtype::f32);
  convert_to_f32(type_, data_, out.data<float>(), static_cast<std::size_t>(numel()));
  return out;
}

void tensor::check_type(std::size_t elem_size, bool matches) const {
  if (!matches || elem_size != dtype_size(type_))
    throw std::logic_error("tensor::data: element type is " + std::string(dtype_name(type_)));
}

}  // namespace troupe
