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
