// Speculative decoding is lossless: greedy output equals the target's own for many prompts and
// k in {1, 3, 5} (EOS-separated documents included, so the N-gram cache rolls back across a
// segment boundary), and the rejection rule reproduces the target's distribution (chi-square).
#include <gtest/gtest.h>

#include <cmath>
#include <map>

#include "gpu/cpu/cpu_backend.hpp"
#include "model/speculative.hpp"
#include "protocol/errors.hpp"
#include "test_support.hpp"
#include "tokenizer/tokenizer.hpp"

namespace troupe {
namespace {

struct models {
  cpu_backend be{1};
  std::unique_ptr<model> target, draft, other_vocab;
  std::filesystem::path draft_dir;
  tokenizer tok = tokenizer::load(std::string(TROUPE_SOURCE_DIR) + "/configs/tokenizers/troupe-bpe-4k.json");
  models() {
    target = model::load(test::make_model("spec_target", test::tiny_config(), 3, dtype::f32), be);
    draft_dir = test::make_model("spec_draft", test::tiny_config(R"("hidden_size": 24, "num_layers": 1)", false), 4, dtype::f32);
    draft = model::load(draft_dir, be);
    other_vocab = model::load(test::make_model("spec_other", test::tiny_config(R"("vocab_size": 101)", false), 5), be);
  }
};

models& shared() {
  static models m;
  return m;
}

std::vector<std::int32_t> random_prompt(std::uint64_t seed, std::int32_t vocab, std::int32_t eos) {
  rng gen(seed);
  std::vector<std::int32_t> p;
  const auto n = 3 + static_cast<int>(gen.next() % 9);
  for (int i = 0; i < n; ++i) p.push_back(static_cast<std::int32_t>(3 + gen.next() % static_cast<std::uint64_t>(vocab - 3)));
  if (seed % 2 == 0) p[static_cast<std::size_t>(n / 2)] = eos;  // two documents
  return p;
}

// Greedy parameters that ignore EOS.
generation_params greedy_ignoring_eos(std::int32_t max_tokens) {
  generation_params params;
  params.sampling.temperature = 0;
  params.max_tokens = max_tokens;
  params.stop_on_eos = false;
  return params;
}

// n random prompts (seeds seed0..) with greedy parameters that ignore EOS.
std::pair<std::vector<std::vector<std::int32_t>>, std::vector<generation_params>> greedy_batch(models& m, std::uint64_t seed0,
                                                                                             std::size_t n, std::int32_t max_tokens) {
  std::vector<std::vector<std::int32_t>> prompts;
  std::vector<generation_params> params(n, greedy_ignoring_eos(max_tokens));
  for (std::size_t i = 0; i < n; ++i)
    prompts.push_back(random_prompt(seed0 + i, static_cast<std::int32_t>(m.target->config().vocab_size),
                                    m.target->config().eos_token_id));
  return {prompts, params};
}

TEST(speculative, greedy_output_is_the_targets_own) {
  auto& m = shared();
  const generation_params params = greedy_ignoring_eos(24);
  const auto eos = m.target->config().eos_token_id;
  for (std::uint64_t seed = 0; seed < 8; ++seed) {
    const auto prompt = random_prompt(seed, static_cast<std::int32_t>(m.target->config().vocab_size), eos);
    const auto plain = generate(*m.target, m.tok, prompt, params);
    for (std::int64_t k : {1, 3, 5}) {
      for (model* draft : {m.draft.get(), m.target.get()}) {  // a weak draft, and a perfect one (all accepted)
        speculation_stats stats;
        const auto spec = generate_speculative(*m.target, *draft, m.tok, prompt, params, {k, 1.0, 8, 0}, stats);  // always on
        ASSERT_EQ(spec.ids, plain.ids) << "seed " << seed << ", k " << k;
        EXPECT_EQ(spec.text, plain.text);
        EXPECT_GT(stats.rounds, 0);
        if (draft == m.target.get()) EXPECT_EQ(stats.accepted, stats.drafted) << "the target as its own draft";
      }
    }
  }
}

TEST(speculative, greedy_with_a_repetition_penalty_is_the_targets_own) {
  // Greedy decoding applies the penalty before the argmax; verification must do the same.
  auto& m = shared();
  generation_params params = greedy_ignoring_eos(40);
  params.sampling.repetition_penalty = 1.8f;
  for (std::uint64_t seed = 0; seed < 4; ++seed) {
    const auto prompt = random_prompt(300 + seed, static_cast<std::int32_t>(m.target->config().vocab_size),
                                      m.target->config().eos_token_id);
    const auto plain = generate(*m.target, m.tok, prompt, params);
    for (model* draft : {m.draft.get(), m.target.get()}) {
      speculation_stats stats;
      EXPECT_EQ(generate_speculative(*m.target, *draft, m.tok, prompt, params, {3, 1.0, 8, 0}, stats).ids, plain.ids)
          << "seed " << seed;
    }
  }
}

TEST(speculative, generated_eos_resets_the_ngram_cache_like_a_plain_run) {
  // Force EOS into the generated text with stop_on_eos off: a prompt that ends in EOS makes the
  // verified tokens cross a segment boundary at once.
  auto& m = shared();
  const generation_params params = greedy_ignoring_eos(16);
  const std::vector<std::int32_t> prompt{5, 9, 13, m.target->config().eos_token_id};
  const auto plain = generate(*m.target, m.tok, prompt, params);
  speculation_stats stats;
  EXPECT_EQ(generate_speculative(*m.target, *m.draft, m.tok, prompt, params, {3}, stats).ids, plain.ids);
}

TEST(speculative, a_draft_with_another_vocabulary_is_refused) {
  auto& m = shared();
  speculation_stats stats;
  EXPECT_THROW(generate_speculative(*m.target, *m.other_vocab, m.tok, {5, 6}, {}, {3}, stats), input_error);
  EXPECT_THROW(generate_speculative(*m.target, *m.draft, m.tok, {5, 6}, {}, {0}, stats), input_error);
}

TEST(speculative, a_draft_that_does_not_pay_is_switched_off_and_retried) {
  auto& m = shared();
  const generation_params params = greedy_ignoring_eos(80);
  const std::vector<std::int32_t> prompt{4, 8, 15, 16, 23, 42};
  const auto plain = generate(*m.target, m.tok, prompt, params);
  // An unreachable bar: every window fails it, so speculation goes off, comes back, goes off.
  speculation_config strict{3, 4.0, 4, 10};
  speculation_stats stats;
  std::vector<std::string> log;
  const auto out = generate_speculative(*m.target, *m.draft, m.tok, prompt, params, strict, stats, {},
                                        [&](const std::string& line) { log.push_back(line); });
  EXPECT_EQ(out.ids, plain.ids);
  EXPECT_GE(stats.turned_off, 2);
  EXPECT_GT(stats.plain_steps, 10);
  ASSERT_GE(log.size(), 3u);
  EXPECT_NE(log[0].find("speculation off"), std::string::npos) << log[0];
  EXPECT_NE(log[1].find("speculation on again"), std::string::npos) << log[1];
  // The target as its own draft accepts everything: speculation stays on.
  speculation_stats perfect;
  generate_speculative(*m.target, *m.target, m.tok, prompt, params, {3, 1.0, 4, 10}, perfect);
  EXPECT_EQ(perfect.turned_off, 0);
  EXPECT_EQ(perfect.accepted, perfect.drafted);
}

TEST(speculative, a_batch_with_different_draft_lengths_verifies_together) {
  // 8 sequences of different prompts and budgets: their rounds draft different numbers of
  // tokens (budget ends, a policy switched off) and verify in one target forward; each must
  // produce what it produces alone.
  auto& m = shared();
  auto [prompts, params] = greedy_batch(m, 100, 8, 0);
  for (std::size_t i = 0; i < 8; ++i) {
    params[i].sampling.temperature = i % 3 == 2 ? 0.9f : 0.0f;  // greedy and sampled side by side
    params[i].sampling.seed = i;
    params[i].max_tokens = static_cast<std::int32_t>(5 + 3 * i);
  }
  const speculation_config config{3, 1.5, 3, 4, 0};
  std::vector<speculation_stats> stats;
  const auto batch = generate_speculative_batch(*m.target, *m.draft, m.tok, prompts, params, config, stats);
  ASSERT_EQ(batch.size(), 8u);
  std::int64_t plain_steps = 0;
  for (std::size_t i = 0; i < 8; ++i) {
    speculation_stats alone_stats;
    const auto alone = generate_speculative(*m.target, *m.draft, m.tok, prompts[i], params[i], config, alone_stats);
    EXPECT_EQ(batch[i].ids, alone.ids) << "sequence " << i;
    EXPECT_EQ(batch[i].ids.size(), static_cast<std::size_t>(params[i].max_tokens));
    if (params[i].sampling.temperature == 0) EXPECT_EQ(batch[i].ids, generate(*m.target, m.tok, prompts[i], params[i]).ids);
    plain_steps += stats[i].plain_steps;
  }
  EXPECT_GT(plain_steps, 0);  // some rounds drafted nothing while others drafted
}

TEST(speculative, rounds_of_more_than_max_batch_sequences_draft_nothing) {
  auto& m = shared();
  const auto [prompts, params] = greedy_batch(m, 40, 6, 12);
  for (const std::int64_t max_batch : {4, 6}) {
    speculation_config config;
    config.retry_after = 0;
    config.max_batch = max_batch;
    std::vector<speculation_stats> stats;
    const auto batch = generate_speculative_batch(*m.target, *m.draft, m.tok, prompts, params, config, stats);
    for (std::size_t i = 0; i < prompts.size(); ++i) {
      EXPECT_EQ(batch[i].ids, generate(*m.target, m.tok, prompts[i], params[i]).ids) << "sequence " << i;
      if (max_batch == 4) {  // six sequences to the end: every step plain
        EXPECT_EQ(stats[i].rounds, 0) << "sequence " << i;
        EXPECT_EQ(stats[i].plain_steps, params[i].max_tokens - 1) << "sequence " << i;
      } else {
        EXPECT_GT(stats[i].rounds, 0) << "sequence " << i;
      }
    }
  }
}

TEST(speculative, hot_swapping_drafts_mid_generation_changes_no_output) {
  auto& m = shared();
  const auto [prompts, params] = greedy_batch(m, 200, 8, 30);
  // Owned drafts loaded from disk, so releasing the old one is observable; every few rounds a
  // new one is offered, and now and then one of another vocabulary (refused).
  const auto draft_dir = m.draft_dir;
  int round = 0, swaps = 0, refusals = 0;
  std::weak_ptr<model> first_draft;
  std::shared_ptr<model> offered = model::load(draft_dir, m.be);
  first_draft = offered;
  const std::shared_ptr<model> other(std::shared_ptr<model>{}, m.other_vocab.get());
  auto source = [&]() -> std::shared_ptr<model> {
    ++round;
    if (round % 5 == 0) return other;
    if (round % 3 == 0) offered = model::load(draft_dir, m.be);  // a fresh copy: a swap
    return offered;
  };
  std::vector<speculation_stats> stats;
  const auto results = generate_speculative_batch(*m.target, source, m.tok, prompts, params, {3, 1.0, 8, 0}, stats, {},
                                                  [&](const std::string& line) {
                                                    swaps += line == "draft swapped";
                                                    refusals += line.find("draft refused") != std::string::npos;
                                                  });
  for (std::size_t i = 0; i < prompts.size(); ++i)
    EXPECT_EQ(results[i].ids, generate(*m.target, m.tok, prompts[i], params[i]).ids) << "sequence " << i;
  EXPECT_GE(swaps, 3);
  EXPECT_GE(refusals, 2);
  offered.reset();
  EXPECT_TRUE(first_draft.expired()) << "the first draft is still held after it was swapped out";
}

TEST(speculation_policy, turns_off_below_the_threshold_and_retries) {
  speculation_policy p({3, 1.0, 2, 3});
  EXPECT_EQ(p.next_draft_tokens(), 3);
  EXPECT_EQ(p.record_round(2), speculation_switch::none);
  EXPECT_EQ(p.record_round(1), speculation_switch::none);   // mean 1.5
  EXPECT_EQ(p.record_round(0), speculation_switch::turned_off);  // mean 0.5
  EXPECT_EQ(p.next_draft_tokens(), 0);
  EXPECT_EQ(p.record_plain_step(), speculation_switch::none);
  EXPECT_EQ(p.record_plain_step(), speculation_switch::none);
  EXPECT_EQ(p.record_plain_step(), speculation_switch::turned_on);
  EXPECT_EQ(p.next_draft_tokens(), 3);
  p.record_round(0);
  EXPECT_EQ(p.record_round(0), speculation_switch::turned_off);  // the retry failed: wait twice as long
  for (int i = 0; i < 5; ++i) EXPECT_EQ(p.record_plain_step(), speculation_switch::none);
  EXPECT_EQ(p.record_plain_step(), speculation_switch::turned_on);
  speculation_policy never({3, 1.0, 2, 0});  // retry_after 0: never off
  for (int i = 0; i < 5; ++i) EXPECT_EQ(never.record_round(0), speculation_switch::none);
}

// Pearson's chi-square statistic of counts against expected probabilities.
double chi_square(const std::vector<int>& counts, const std::vector<float>& p, int n) {
  double x = 0;
  for (std::size_t i = 0; i < counts.size(); ++i) {
    const double e = n * static_cast<double>(p[i]);
    if (e > 0) x += (counts[i] - e) * (counts[i] - e) / e;
  }
  return x;
}

TEST(speculative, the_rejection_rule_reproduces_the_target_distribution) {
  // Vocabulary of 6 with p and q far apart; the first emitted token of a round (accepted draft
  // or correction) must follow p. 7.1e-4 is the chance of chi-square(5) > 21.
  const std::vector<float> p{0.05f, 0.40f, 0.10f, 0.25f, 0.15f, 0.05f};
  const std::vector<float> q{0.30f, 0.10f, 0.30f, 0.05f, 0.05f, 0.20f};
  for (std::uint64_t seed : {1u, 2u, 3u}) {
    rng gen(seed);
    const int n = 40000;
    std::vector<int> first(6, 0), second(6, 0);
    int second_n = 0;
    for (int i = 0; i < n; ++i) {
      // Two drafts from q; the target's distribution is p at every position.
      std::vector<std::int32_t> drafts;
      for (int j = 0; j < 2; ++j) {
        double u = gen.uniform();
        std::int32_t d = 0;
        while (d < 5 && (u -= q[static_cast<std::size_t>(d)]) >= 0) ++d;
        drafts.push_back(d);
      }
      const std::vector<std::vector<float>> ps{p, p, p}, qs{q, q};
      const auto v = verify_sampled(ps, qs, drafts, gen);
      ++first[static_cast<std::size_t>(v.accepted > 0 ? drafts[0] : v.next)];
      if (v.accepted >= 1) {  // the token after an accepted first draft follows p as well
        ++second[static_cast<std::size_t>(v.accepted > 1 ? drafts[1] : v.next)];
        ++second_n;
      }
    }
    EXPECT_LT(chi_square(first, p, n), 21.0) << "seed " << seed;
    EXPECT_LT(chi_square(second, p, second_n), 21.0) << "seed " << seed;
  }
  // The same test notices a broken rule: always accepting gives q, far from p.
  std::vector<int> q_counts(6, 0);
  rng gen(9);
  for (int i = 0; i < 40000; ++i) {
    double u = gen.uniform();
    std::size_t d = 0;
    while (d < 5 && (u -= q[d]) >= 0) ++d;
    ++q_counts[d];
  }
  EXPECT_GT(chi_square(q_counts, p, 40000), 1000.0);
}

TEST(speculative, sampled_generation_with_and_without_speculation_agree_in_distribution) {
  // The second generated token (the first one speculation decides) over many seeds, with the
  // target alone and with the draft: a two-sample chi-square over the tokens seen.
  auto& m = shared();
  generation_params params;
  params.sampling.temperature = 1.5f;  // flat enough that many tokens occur
  params.sampling.top_k = 6;
  params.max_tokens = 2;
  params.stop_on_eos = false;
  const std::vector<std::int32_t> prompt{7, 11, 19};
  std::map<std::int32_t, int> plain, spec;
  const int n = 1500;
  for (int i = 0; i < n; ++i) {
    params.sampling.seed = static_cast<std::uint64_t>(i);
    const auto a = generate(*m.target, m.tok, prompt, params);
    speculation_stats stats;
    const auto b = generate_speculative(*m.target, *m.draft, m.tok, prompt, params, {1}, stats);
    ++plain[a.ids.at(1) + 1000 * a.ids.at(0)];
    ++spec[b.ids.at(1) + 1000 * b.ids.at(0)];
  }
  // Two-sample chi-square over (first, second) pairs seen at least 10 times in total.
  const auto [x, df] = test::two_sample_chi_square(plain, spec, 10);
  ASSERT_GT(df, 3);
  // chi-square(df) stays under df + 5 sqrt(2 df) except with negligible probability.
  EXPECT_LT(x, df + 5 * std::sqrt(2.0 * df)) << "df " << df;
}

}  // namespace
}  // namespace troupe
