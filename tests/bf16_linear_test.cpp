// The CPU backend's bf16 GEMM against a float64 reference for every path (streaming M <= 4,
// streaming in passes for M <= 16, widened sgemm beyond), with K not a multiple of the vector
// width; and its invariant: for M up to the streaming limit each row equals the row alone.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "gpu/cpu/bf16_linear.hpp"
#include "gpu/cpu/thread_pool.hpp"
#include "model/sampler.hpp"

namespace troupe {
namespace {

std::uint16_t to_bf16(float f) {
  std::uint32_t bits;
  std::memcpy(&bits, &f, 4);
  return static_cast<std::uint16_t>((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
}

float from_bf16(std::uint16_t h) {
  const std::uint32_t bits = static_cast<std::uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

TEST(bf16_linear, every_path_matches_float64_and_rows_do_not_depend_on_m) {
  const std::int64_t n = 37, k = 70;
  rng gen(5);
  std::vector<std::uint16_t> w(static_cast<std::size_t>(n * k));
  for (auto& v : w) v = to_bf16(static_cast<float>(gen.normal()));
  thread_pool pool(2);
  for (std::int64_t m = 1; m <= 20; ++m) {
    std::vector<float> x(static_cast<std::size_t>(m * k)), y(static_cast<std::size_t>(m * n), NAN);
    for (auto& v : x) v = static_cast<float>(gen.normal());
    linear_bf16(x.data(), w.data(), y.data(), m, n, k, false, pool);
    double num = 0, den = 0;
    for (std::int64_t r = 0; r < m; ++r)
      for (std::int64_t c = 0; c < n; ++c) {
        double ref = 0;
        for (std::int64_t j = 0; j < k; ++j) ref += static_cast<double>(x[static_cast<std::size_t>(r * k + j)]) * from_bf16(w[static_cast<std::size_t>(c * k + j)]);
        const double got = y[static_cast<std::size_t>(r * n + c)];
        ASSERT_FALSE(std::isnan(got)) << "unwritten output, m " << m;
        num += (got - ref) * (got - ref);
        den += ref * ref;
      }
    EXPECT_LT(std::sqrt(num / den), 1e-6) << "m " << m;  // float32 accumulation over K = 70
    if (m <= bf16_stream_max_m)
      for (std::int64_t r = 0; r < m; ++r) {
        std::vector<float> alone(static_cast<std::size_t>(n));
        linear_bf16(x.data() + r * k, w.data(), alone.data(), 1, n, k, false, pool);
        for (std::int64_t c = 0; c < n; ++c) ASSERT_EQ(alone[static_cast<std::size_t>(c)], y[static_cast<std::size_t>(r * n + c)]) << "m " << m;
      }
    // Accumulate mode adds onto what is there.
    std::vector<float> twice = y;
    linear_bf16(x.data(), w.data(), twice.data(), m, n, k, true, pool);
    for (std::size_t i = 0; i < y.size(); ++i) EXPECT_NEAR(twice[i], 2 * y[i], 1e-5 * (1 + std::abs(y[i])));
  }
}

}  // namespace
}  // namespace troupe
