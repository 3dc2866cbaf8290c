#include <gtest/gtest.h>

#include <cmath>

#include "gpu/cpu/cpu_backend.hpp"
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

// backend::sample (what the serving head calls) picks what a sampler does with the same seed,
// row by row, with the draws' rows in any order.
TEST(sampler, backend_sample_follows_the_sequences_samplers) {
  cpu_backend be(1);
  const std::int64_t vocab = 50;
  tensor logits = tensor::empty({3, vocab}, dtype::f32);
  rng g(5);
  for (std::int64_t i = 0; i < logits.numel(); ++i) logits.data<float>()[i] = static_cast<float>(g.normal());
  const std::vector<sampling_params> rules = {{.temperature = 0.9f, .top_k = 10, .seed = 1},
                                              {.temperature = 0.0f, .repetition_penalty = 2.0f},
                                              {.temperature = 1.1f, .top_p = 0.8f, .repetition_penalty = 1.4f, .seed = 3}};
  const std::vector<std::int32_t> context = {4, 9, 4, 17};
  std::vector<sampler> by_backend, by_host;
  for (const auto& r : rules) {
    by_backend.emplace_back(r);
    by_host.emplace_back(r);
  }
  for (int step = 0; step < 20; ++step) {
    std::vector<token_draw> draws;
    for (std::size_t i = 0; i < rules.size(); ++i)
      draws.push_back({.row = static_cast<std::int64_t>(2 - i), .params = rules[i], .u = by_backend[i].next_uniform(),
                       .context = context});
    tensor picked = be.empty({3}, dtype::i32);
    be.sample(logits, draws, picked);
    for (std::size_t i = 0; i < rules.size(); ++i) {
      const float* row = logits.data<float>() + (2 - i) * vocab;
      EXPECT_EQ(picked.data<std::int32_t>()[i], by_host[i].sample({row, static_cast<std::size_t>(vocab)}, context))
          << "step " << step << " rule " << i;
    }
  }
}

// A draw naming a row the logits do not have, or a tokens tensor of the wrong size, is refused
// with the reason; nothing is written.
TEST(sampler, backend_sample_refuses_bad_draws) {
  cpu_backend be(1);
  tensor logits = tensor::zeros({2, 8}, dtype::f32);
  tensor picked = be.empty({1}, dtype::i32);
  picked.data<std::int32_t>()[0] = 77;
  const std::vector<token_draw> beyond = {{.row = 2, .params = {.temperature = 0.0f}}};
  try {
    be.sample(logits, beyond, picked);
    FAIL() << "row 2 of 2 accepted";
  } catch (const std::out_of_range& e) {
    EXPECT_NE(std::string(e.what()).find("row 2 of 2"), std::string::npos) << e.what();
  }
  EXPECT_EQ(picked.data<std::int32_t>()[0], 77);
  const std::vector<token_draw> two = {{.row = 0}, {.row = 1}};
  EXPECT_THROW(be.sample(logits, two, picked), std::invalid_argument);  // 2 draws, 1 token slot
}

}  // namespace troupe
