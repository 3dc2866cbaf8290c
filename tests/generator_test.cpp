#include <gtest/gtest.h>

#include <fstream>

#include "gpu/cpu/cpu_backend.hpp"
#include "model/generator.hpp"
#include "model/model.hpp"
#include "protocol/errors.hpp"
#include "tests/test_support.hpp"
#include "tokenizer/tokenizer.hpp"

namespace troupe {

std::filesystem::path write_small_tokenizer(const std::filesystem::path& dir);  // tokenizer_test.cpp

namespace {

struct fixture {
  std::filesystem::path dir;
  cpu_backend be{1};
  std::unique_ptr<model> m;
  std::unique_ptr<tokenizer> tok;
  fixture() {
    dir = test::make_model("generator", test::tiny_config(R"("vocab_size": 128)"), 4);
    m = model::load(dir, be);
    tok = std::make_unique<tokenizer>(tokenizer::load(write_small_tokenizer(dir)));
  }
};

}  // namespace

TEST(generator, greedy_is_deterministic_and_streams_the_final_text) {
  fixture f;
  generation_params p;
  p.sampling.temperature = 0;
  p.max_tokens = 12;
  p.stop_on_eos = false;
  std::string streamed;
  const auto a = generate(*f.m, *f.tok, {65, 66, 67}, p, [&](std::string_view t, std::int32_t) { streamed += t; });
  const auto b = generate(*f.m, *f.tok, {65, 66, 67}, p);
  EXPECT_EQ(a.ids, b.ids);
  EXPECT_EQ(a.ids.size(), 12u);
  EXPECT_EQ(a.reason, finish_reason::length);
  EXPECT_EQ(streamed, a.text);
}

TEST(generator, stop_string_ends_generation_and_is_not_emitted) {
  fixture f;
  generation_params p;
  p.sampling.temperature = 0;
  p.max_tokens = 12;
  p.stop_on_eos = false;
  const auto free_run = generate(*f.m, *f.tok, {65, 66, 67}, p);
  ASSERT_GE(free_run.text.size(), 4u);
  p.stop = {free_run.text.substr(2, 2)};  // a stop string the greedy run is known to produce
  std::string streamed;
  const auto r = generate(*f.m, *f.tok, {65, 66, 67}, p, [&](std::string_view t, std::int32_t) { streamed += t; });
  EXPECT_EQ(r.reason, finish_reason::stop_string);
  EXPECT_EQ(r.text, free_run.text.substr(0, free_run.text.find(p.stop[0])));
  EXPECT_EQ(streamed, r.text);
}

TEST(generator, eos_ends_generation) {
  fixture f;
  generation_params p;
  p.sampling.temperature = 0;
  p.max_tokens = 30;
  p.stop_on_eos = false;
  const auto free_run = generate(*f.m, *f.tok, {70, 71}, p);
  // Make the model's EOS the token greedy decoding produces third: generation must stop there.
  const std::int32_t third = free_run.ids[2];
  auto cfg = test::tiny_config(R"("vocab_size": 128, "eos_token_id": )" + std::to_string(third));
  std::ofstream(f.dir / "config.json") << model_config_to_json(cfg);
  auto m2 = model::load(f.dir, f.be);
  p.stop_on_eos = true;
  const auto r = generate(*m2, *f.tok, {70, 71}, p);
  EXPECT_EQ(r.reason, finish_reason::eos);
  EXPECT_LE(r.ids.size(), 3u);
  EXPECT_EQ(r.ids.back(), third);
}

TEST(generator, forward_argmax_is_the_argmax_of_forwards_rows) {
  fixture f;
  sequence_state a1, a2, b1, b2;
  const std::vector<std::int32_t> p1{65, 66, 67, 68}, p2{70, 71};
  for (const auto mode : {logits_mode::last_token, logits_mode::all_tokens}) {
    const std::vector<step_input> by_logits{{&a1, p1}, {&a2, p2}}, by_ids{{&b1, p1}, {&b2, p2}};
    const tensor logits = f.m->forward(by_logits, mode);
    const auto ids = f.m->forward_argmax(by_ids, mode);
    ASSERT_EQ(static_cast<std::int64_t>(ids.size()), logits.dim(0));
    EXPECT_EQ(ids.size(), mode == logits_mode::last_token ? 2u : 6u);
    for (std::int64_t r = 0; r < logits.dim(0); ++r)
      EXPECT_EQ(ids[static_cast<std::size_t>(r)],
                argmax({logits.data<float>() + r * logits.dim(1), static_cast<std::size_t>(logits.dim(1))}))
          << "row " << r;
    EXPECT_EQ(a1.num_tokens, b1.num_tokens);
    EXPECT_EQ(a1.ngram, b1.ngram);
  }
}

// draft_greedy against its definition: step by step, each feeding the argmax of forward()'s
// logits before it; the caches must end alike (the fed tokens and every pick but the last).
TEST(generator, draft_greedy_is_a_chain_of_argmax_steps) {
  fixture f;
  for (const std::int64_t steps : {1, 2, 5}) {
    std::vector<sequence_state> chained(2), stepped(2);
    std::vector<std::vector<std::int32_t>> feed{{65, 66, 67, 68}, {70, 71}};
    for (int round = 0; round < 3; ++round) {
      std::vector<step_input> in;
      for (std::size_t i = 0; i < feed.size(); ++i) in.push_back({&chained[i], feed[i]});
      const auto picks = f.m->draft_greedy(in, steps);
      ASSERT_EQ(picks.size(), 2u);
      std::vector<std::vector<std::int32_t>> expect(2), next = feed;
      for (std::int64_t j = 0; j < steps; ++j) {
        std::vector<step_input> one;
        for (std::size_t i = 0; i < next.size(); ++i) one.push_back({&stepped[i], next[i]});
        const tensor logits = f.m->forward(one, logits_mode::last_token);
        for (std::size_t i = 0; i < next.size(); ++i) {
          const auto r = static_cast<std::int64_t>(i);
          expect[i].push_back(argmax({logits.data<float>() + r * logits.dim(1), static_cast<std::size_t>(logits.dim(1))}));
          next[i].assign(1, expect[i].back());
        }
      }
      for (std::size_t i = 0; i < feed.size(); ++i) {
        EXPECT_EQ(picks[i], expect[i]) << steps << " steps, round " << round << ", sequence " << i;
        // The step-by-step loop never feeds its last pick; neither does draft_greedy.
        EXPECT_EQ(chained[i].num_tokens, stepped[i].num_tokens);
        EXPECT_EQ(chained[i].ngram, stepped[i].ngram);
        feed[i].assign(1, picks[i].back());  // the next round feeds the last pick
      }
    }
  }
  sequence_state s;
  const std::vector<std::int32_t> p{65};
  const std::vector<step_input> in{{&s, p}};
  EXPECT_THROW(f.m->draft_greedy(in, 0), std::logic_error);
}

TEST(generator, backend_argmax_picks_the_lowest_id_of_each_rows_largest) {
  cpu_backend be{1};
  tensor logits = tensor::empty({3, 5}, dtype::f32);
  const float values[] = {0.5f, 2.0f, -1.0f, 2.0f, 1.0f,  // tie: the lower id
                          -3.0f, -2.0f, -2.5f, -4.0f, -2.1f, 9.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  std::copy(std::begin(values), std::end(values), logits.data<float>());
  for (const dtype type : {dtype::i32, dtype::i64}) {
    tensor ids = tensor::empty({3}, type);
    be.argmax(logits, ids);
    const std::int64_t expect[] = {1, 1, 0};
    for (int r = 0; r < 3; ++r)
      EXPECT_EQ(type == dtype::i32 ? ids.data<std::int32_t>()[r] : ids.data<std::int64_t>()[r], expect[r]) << "row " << r;
  }
  tensor wrong = tensor::empty({2}, dtype::i32);
  EXPECT_THROW(be.argmax(logits, wrong), std::invalid_argument);
  tensor floats = tensor::empty({3}, dtype::f32);
  EXPECT_THROW(be.argmax(logits, floats), std::invalid_argument);
}

TEST(generator, greedy_batch_continues_each_prompt_as_generate_does_alone) {
  fixture f;
  const std::vector<std::vector<std::int32_t>> prompts{{65, 66, 67}, {70}, {80, 81, 82, 83, 84, 85}};
  generation_params p;
  p.sampling.temperature = 0;
  p.max_tokens = 9;
  p.stop_on_eos = false;
  const auto batch = generate_greedy_batch(*f.m, prompts, p.max_tokens, false);
  ASSERT_EQ(batch.size(), prompts.size());
  for (std::size_t i = 0; i < prompts.size(); ++i) EXPECT_EQ(batch[i], generate(*f.m, *f.tok, prompts[i], p).ids) << i;

  // With EOS: a sequence whose continuation reaches EOS ends there (EOS kept), the rest go on.
  auto cfg = test::tiny_config(R"("vocab_size": 128, "eos_token_id": )" + std::to_string(batch[0][2]));
  std::ofstream(f.dir / "config.json") << model_config_to_json(cfg);
  auto m2 = model::load(f.dir, f.be);
  const auto stopped = generate_greedy_batch(*m2, prompts, p.max_tokens, true);
  p.stop_on_eos = true;
  for (std::size_t i = 0; i < prompts.size(); ++i) EXPECT_EQ(stopped[i], generate(*m2, *f.tok, prompts[i], p).ids) << i;
  EXPECT_EQ(stopped[0].size(), 3u);
  EXPECT_THROW(generate_greedy_batch(*f.m, {{}}, 4, false), input_error);
}

}  // namespace troupe
