#include <gtest/gtest.h>

#include <cmath>

#include "model/sampler.hpp"
#include "protocol/errors.hpp"

namespace troupe {

TEST(sampler, greedy_is_argmax_lowest_id_on_ties) {
  sampler s({.temperature = 0.0f});
  const std::vector<float> logits = {0.1f, 2.0f, -1.0f, 2.0f};
  EXPECT_EQ(s.sample(logits, {}), 1);
}

TEST(sampler, temperature_sampling_follows_softmax) {
  // 20000 draws over 4 tokens; each frequency within 4 standard deviations of softmax(logits/T).
  const std::vector<float> logits = {1.0f, 0.0f, -0.5f, 0.7f};
  const float t = 0.8f;
  sampler s({.temperature = t, .seed = 42});
  std::vector<int> counts(4);
  const int n = 20000;
  for (int i = 0; i < n; ++i) counts[static_cast<std::size_t>(s.sample(logits, {}))]++;
  double z = 0;
  for (float l : logits) z += std::exp(l / t);
  for (int k = 0; k < 4; ++k) {
    const double p = std::exp(logits[k] / t) / z;
    EXPECT_NEAR(counts[k] / double(n), p, 4 * std::sqrt(p * (1 - p) / n)) << k;
  }
}

TEST(sampler, top_k_and_top_p_restrict_the_support) {
  const std::vector<float> logits = {3.0f, 2.9f, 0.0f, -1.0f, 2.8f};
  sampler k2({.temperature = 1.0f, .top_k = 2, .seed = 1});
  for (int i = 0; i < 500; ++i) {
    const auto id = k2.sample(logits, {});
    EXPECT_TRUE(id == 0 || id == 1) << id;
  }
  // Masses: ~0.36, 0.33, 0.30, small: top_p 0.5 keeps exactly the first two.
  sampler p({.temperature = 1.0f, .top_p = 0.5f, .seed = 2});
  const auto dist = p.distribution(logits, {});
  EXPECT_GT(dist[0], 0);
  EXPECT_GT(dist[1], 0);
  EXPECT_EQ(dist[4], 0);
  EXPECT_NEAR(dist[0] + dist[1], 1.0, 1e-6);
}

TEST(sampler, same_seed_same_tokens) {
  const std::vector<float> logits = {0.3f, 0.1f, 0.2f, 0.0f, 0.25f};
  sampler a({.temperature = 1.0f, .seed = 9}), b({.temperature = 1.0f, .seed = 9}), c({.temperature = 1.0f, .seed = 10});
  std::vector<int> xa, xb, xc;
  for (int i = 0; i < 50; ++i) {
    xa.push_back(a.sample(logits, {}));
    xb.push_back(b.sample(logits, {}));
    xc.push_back(c.sample(logits, {}));
  }
  EXPECT_EQ(xa, xb);
  EXPECT_NE(xa, xc);
}

TEST(sampler, repetition_penalty_discourages_seen_tokens) {
  const std::vector<float> logits = {2.0f, 1.9f, -1.0f};
  sampler s({.temperature = 0.0f, .repetition_penalty = 1.5f});
  const std::vector<std::int32_t> context = {0};
  EXPECT_EQ(s.sample(logits, context), 1);  // 2.0 / 1.5 < 1.9
}

TEST(sampler, invalid_parameters_are_named) {
  EXPECT_THROW(sampler({.temperature = -1.0f}), input_error);
  EXPECT_THROW(sampler({.top_k = -2}), input_error);
  EXPECT_THROW(sampler({.top_p = 0.0f}), input_error);
  EXPECT_THROW(sampler({.repetition_penalty = 0.0f}), input_error);
}

}  // namespace troupe
