// Element types of tensors and the conversions between them.
// Invariant: bf16 and f16 round-to-nearest-even on the way down, exact on the way up, so a
// float32 -> bf16 -> float32 round trip matches PyTorch's `.to(torch.bfloat16).float()`.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

namespace troupe {

enum class dtype : std::uint8_t { f32, bf16, f16, i32, i64 };

/// Bytes per element.
constexpr std::size_t dtype_size(dtype t) {
  switch (t) {
    case dtype::f32: case dtype::i32: return 4;
    case dtype::bf16: case dtype::f16: return 2;
    case dtype::i64: return 8;
  }
  return 0;
}

/// Name as used in safetensors headers ("F32", "BF16", ...).
std::string_view dtype_safetensors_name(dtype t);
/// Parses a safetensors dtype name; returns false for names Troupe does not handle.
bool dtype_from_safetensors_name(std::string_view name, dtype& out);
/// Lower-case name for messages ("f32", "bf16", ...).
std::string_view dtype_name(dtype t);

inline float bf16_to_f32(std::uint16_t v) {
  std::uint32_t bits = static_cast<std::uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline std::uint16_t f32_to_bf16(float f) {
  std::uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7f800000u) == 0x7f800000u && (bits & 0x007fffffu)) return static_cast<std::uint16_t>((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<std::uint16_t>(bits >> 16);
}

float f16_to_f32(std::uint16_t v);
std::uint16_t f32_to_f16(float f);

/// Converts `n` elements of type `from` at `src` into float32 at `dst`.
void convert_to_f32(dtype from, const void* src, float* dst, std::size_t n);
/// Converts `n` float32 values into type `to` (f32, bf16 or f16).
void convert_from_f32(dtype to, const float* src, void* dst, std::size_t n);

}  // namespace troupe
