#include "gpu/dtype.hpp"

#include <cmath>
#include <stdexcept>

namespace troupe {

std::string_view dtype_safetensors_name(dtype t) {
  switch (t) {
    case dtype::f32: return "F32";
    case dtype::bf16: return "BF16";
    case dtype::f16: return "F16";
    case dtype::i32: return "I32";
    case dtype::i64: return "I64";
  }
  return "?";
}

bool dtype_from_safetensors_name(std::string_view name, dtype& out) {
  if (name == "F32") out = dtype::f32;
  else if (name == "BF16") out = dtype::bf16;
  else if (name == "F16") out = dtype::f16;
  else if (name == "I32") out = dtype::i32;
  else if (name == "I64") out = dtype::i64;
  else return false;
  return true;
}

std::string_view dtype_name(dtype t) {
  switch (t) {
    case dtype::f32: return "f32";
    case dtype::bf16: return "bf16";
    case dtype::f16: return "f16";
    case dtype::i32: return "i32";
    case dtype::i64: return "i64";
  }
  return "?";
}

float f16_to_f32(std::uint16_t h) {
  const std::uint32_t sign = (h & 0x8000u) << 16;
  std::uint32_t exp = (h >> 10) & 0x1f;
  std::uint32_t mant = h & 0x3ff;
  std::uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: renormalise
      exp = 127 - 15 + 1;
      while (!(mant & 0x400)) { mant <<= 1; --exp; }
      mant &= 0x3ff;
      bits = sign | (exp << 23) | (mant << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

std::uint16_t f32_to_f16(float f) {
  std::uint32_t x;
  std::memcpy(&x, &f, 4);
  const std::uint16_t sign = static_cast<std::uint16_t>((x >> 16) & 0x8000u);
  const std::uint32_t abs = x & 0x7fffffffu;
  if (abs >= 0x7f800000u) return sign | (abs > 0x7f800000u ? 0x7e00 : 0x7c00);
  if (abs >= 0x477ff000u) return sign | 0x7c00;  // rounds to infinity
  if (abs < 0x38800000u) {                        // subnormal or zero in f16
    const float a = std::fabs(f);
    const auto m = static_cast<std::uint32_t>(std::nearbyint(a * 16777216.0f));  // 2^24
    return sign | static_cast<std::uint16_t>(m);
  }
  std::uint32_t r = abs - 0x38000000u;  // rebias exponent 127 -> 15
  r += 0xfffu + ((r >> 13) & 1u);
  return sign | static_cast<std::uint16_t>(r >> 13);
}

void convert_to_f32(dtype from, const void* src, float* dst, std::size_t n) {
  switch (from) {
    case dtype::f32:
      std::memcpy(dst, src, n * 4);
      return;
    case dtype::bf16: {
      const auto* s = static_cast<const std::uint16_t*>(src);
      for (std::size_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(s[i]);
      return;
    }
    case dtype::f16: {
      const auto* s = static_cast<const std::uint16_t*>(src);
      for (std::size_t i = 0; i < n; ++i) dst[i] = f16_to_f32(s[i]);
      return;
    }
    default:
      throw std::invalid_argument("convert_to_f32: integer tensors are not converted to float");
  }
}

void convert_from_f32(dtype to, const float* src, void* dst, std::size_t n) {
  switch (to) {
    case dtype::f32:
      std::memcpy(dst, src, n * 4);
      return;
    case dtype::bf16: {
      auto* d = static_cast<std::uint16_t*>(dst);
      for (std::size_t i = 0; i < n; ++i) d[i] = f32_to_bf16(src[i]);
      return;
    }
    case dtype::f16: {
      auto* d = static_cast<std::uint16_t*>(dst);
      for (std::size_t i = 0; i < n; ++i) d[i] = f32_to_f16(src[i]);
      return;
    }
    default:
      throw std::invalid_argument("convert_from_f32: cannot write float32 into an integer tensor");
  }
}

}  // namespace troupe
