#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "gpu/dtype.hpp"

namespace troupe {

TEST(dtype, bf16_rounds_to_nearest_even) {
  EXPECT_EQ(f32_to_bf16(1.0f), 0x3f80);
  // 1 + 2^-8 is exactly halfway between two bf16 values: ties go to the even mantissa (1.0).
  EXPECT_EQ(f32_to_bf16(1.0f + std::ldexp(1.0f, -8)), 0x3f80);
  // 1 + 3 * 2^-8 is halfway too: rounds up to the even neighbour 1 + 2^-6.
  EXPECT_EQ(f32_to_bf16(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3f82);
  EXPECT_EQ(bf16_to_f32(0xc040), -3.0f);
  EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(std::numeric_limits<float>::quiet_NaN()))));
}

TEST(dtype, f16_round_trips_known_values) {
  EXPECT_EQ(f32_to_f16(1.0f), 0x3c00);
  EXPECT_EQ(f32_to_f16(-2.0f), 0xc000);
  EXPECT_EQ(f32_to_f16(65504.0f), 0x7bff);
  EXPECT_EQ(f32_to_f16(1e6f), 0x7c00);                   // overflow -> inf
  EXPECT_EQ(f32_to_f16(std::ldexp(1.0f, -24)), 0x0001);  // smallest subnormal
  for (std::uint32_t h = 0; h < 0x7c00; ++h) {           // every finite positive half survives a round trip
    ASSERT_EQ(f32_to_f16(f16_to_f32(static_cast<std::uint16_t>(h))), h) << h;
  }
}

TEST(dtype, convert_buffers) {
  const float src[4] = {0.5f, -1.25f, 3.0f, 1e-3f};
  std::uint16_t half[4];
  float back[4];
  convert_from_f32(dtype::bf16, src, half, 4);
  convert_to_f32(dtype::bf16, half, back, 4);
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(back[i], src[i], std::fabs(src[i]) * 1e-2);
  EXPECT_THROW(convert_to_f32(dtype::i32, src, back, 4), std::invalid_argument);
}

}  // namespace troupe
