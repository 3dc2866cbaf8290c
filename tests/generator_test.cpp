#include <gtest/gtest.h>

#include <fstream>

#include "gpu/cpu/cpu_backend.hpp"
#include "model/generator.hpp"
#include "model/model.hpp"
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

}  // namespace troupe
