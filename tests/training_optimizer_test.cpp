// The optimizer (AdamW against a hand-computed update, lazy table rows, clipping, schedule,
// router balancing) and the data (packing, split, deterministic order, bad input).
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <set>

#include "model/npy.hpp"
#include "protocol/errors.hpp"
#include "test_support.hpp"
#include "tokenizer/tokenizer.hpp"
#include "training/dataset.hpp"
#include "training/optimizer.hpp"

namespace troupe {
namespace {

using namespace train;

parameter<float> make_param(param_role role, shape_t shape, float value, float grad) {
  parameter<float> p;
  p.name = "p";
  p.role = role;
  p.shape = shape;
  std::int64_t n = 1;
  for (auto d : shape) n *= d;
  p.value.assign(static_cast<std::size_t>(n), value);
  p.grad.assign(static_cast<std::size_t>(n), grad);
  if (role == param_role::table) p.touched.assign(static_cast<std::size_t>(shape[0]), 0);
  return p;
}

TEST(training_optimizer, adamw_first_steps_match_the_formula) {
  std::deque<parameter<float>> params;
  params.push_back(make_param(param_role::matrix, {2, 3}, 0.5f, 0.2f));
  params.push_back(make_param(param_role::norm, {3}, 1.0f, -0.1f));
  optimizer_config c;
  c.weight_decay = 0.1;
  adamw opt(params);
  opt.step(c, 1, 0.01, 1.0);
  // Step 1: m/(1-b1) = g, v/(1-b2) = g^2, so the update is sign(g) (up to eps), plus decay.
  EXPECT_NEAR(params[0].value[0], 0.5 - 0.01 * (1.0 + 0.1 * 0.5), 1e-6);
  EXPECT_NEAR(params[1].value[0], 1.0 + 0.01, 1e-6);  // norms are not decayed
  // Step 2 with the same gradient: m and v bias-correct to g and g^2 again.
  const float before = params[0].value[0];
  opt.step(c, 2, 0.01, 1.0);
  EXPECT_NEAR(params[0].value[0], before - 0.01 * (1.0 + 0.1 * before), 1e-6);
}

TEST(training_optimizer, lazy_tables_update_only_touched_rows) {
  std::deque<parameter<float>> params;
  params.push_back(make_param(param_role::table, {4, 2}, 1.0f, 0.0f));
  auto& t = params[0];
  t.grad[2] = t.grad[3] = 0.5f;  // row 1
  t.touched[1] = 1;
  adamw opt(params);
  EXPECT_DOUBLE_EQ(opt.grad_square_sum(), 0.5);
  opt.step({}, 1, 0.1, 1.0);
  EXPECT_EQ(t.value[0], 1.0f);
  EXPECT_EQ(t.value[4], 1.0f);
  EXPECT_NEAR(t.value[2], 0.9f, 1e-6);  // no weight decay on tables
  const auto state = opt.state();
  ASSERT_EQ(state.size(), 2u);
  EXPECT_EQ(state[0].values[0], 0.0f);  // untouched rows keep zero moments
  EXPECT_NE(state[0].values[2], 0.0f);
}

TEST(training_optimizer, schedule_warms_up_then_follows_the_cosine) {
  optimizer_config c;
  c.learning_rate = 1.0;
  c.min_learning_rate = 0.1;
  c.warmup_steps = 10;
  c.total_steps = 110;
  EXPECT_DOUBLE_EQ(learning_rate_at(c, 5), 0.5);
  EXPECT_DOUBLE_EQ(learning_rate_at(c, 10), 1.0);
  EXPECT_NEAR(learning_rate_at(c, 60), 0.55, 1e-12);  // half way down the cosine
  EXPECT_NEAR(learning_rate_at(c, 110), 0.1, 1e-12);
  EXPECT_DOUBLE_EQ(clip_factor(c, 0.5), 1.0);
  EXPECT_DOUBLE_EQ(clip_factor(c, 4.0), 0.25);
}

TEST(training_optimizer, router_bias_moves_toward_balance) {
  auto bias = make_param(param_role::router_bias, {4}, 0.0f, 0.0f);
  const std::vector<std::int64_t> load{10, 2, 4, 0};  // mean 4
  update_router_bias(bias, load, 0.01);
  EXPECT_FLOAT_EQ(bias.value[0], -0.01f);
  EXPECT_FLOAT_EQ(bias.value[1], 0.01f);
  EXPECT_FLOAT_EQ(bias.value[2], 0.0f);
  EXPECT_FLOAT_EQ(bias.value[3], 0.01f);
}

class training_data : public ::testing::Test {
 protected:
  void SetUp() override {
    dir = test::temp_dir("training_data");
    std::ofstream(dir / "a.txt") << std::string(3000, 'a') << " the end";
    std::filesystem::create_directories(dir / "more");
    std::ofstream(dir / "more" / "b.txt") << "In the beginning God created the heaven and the earth. " << std::string(2000, 'b');
    tok = std::make_unique<tokenizer>(tokenizer::load(std::string(TROUPE_SOURCE_DIR) + "/configs/tokenizers/troupe-bpe-4k.json"));
  }
  std::filesystem::path dir;
  std::unique_ptr<tokenizer> tok;
};

TEST_F(training_data, packs_documents_with_eos_and_splits_off_validation) {
  corpus_options o{{dir}, 16, 0.1};
  const auto c = token_corpus::build(o, *tok, 2);
  EXPECT_GT(c.num_train_sequences(), 0);
  EXPECT_GE(c.num_validation_sequences(), 1);
  int eos = 0;
  for (std::int64_t i = 0; i < c.num_train_sequences(); ++i) {
    const auto s = c.train_sequence(i);
    ASSERT_EQ(s.size(), 17u);
    for (auto t : s.first(16)) eos += t == 2;
  }
  EXPECT_EQ(eos, 1);  // the end of a.txt (b.txt's EOS is in the validation tail)
  // Consecutive windows overlap by one token: the target of one is the input of the next.
  EXPECT_EQ(c.train_sequence(0)[16], c.train_sequence(1)[0]);
  const auto again = token_corpus::build(o, *tok, 2);
  EXPECT_EQ(again.fingerprint(), c.fingerprint());
}

// Pre-tokenized documents (.npy of ids) join the stream as they are, each followed by EOS,
// alongside text files; bad arrays are refused with what is wrong.
TEST_F(training_data, npy_sources_are_documents_of_ids) {
  const auto npy = test::temp_dir("training_npy");
  tensor doc = tensor::empty({40}, dtype::i64);
  for (std::int64_t i = 0; i < 40; ++i) doc.data<std::int64_t>()[i] = 3 + (i * 37) % 4000;
  write_npy(npy / "a.npy", doc);
  tensor doc32 = tensor::empty({30}, dtype::i32);
  for (std::int64_t i = 0; i < 30; ++i) doc32.data<std::int32_t>()[i] = static_cast<std::int32_t>(3 + i);
  write_npy(npy / "b.npy", doc32);
  corpus_options o{{npy / "a.npy", npy / "b.npy"}, 8, 0.1, 4096};
  const auto c = token_corpus::build(o, *tok, 2);
  ASSERT_EQ(c.num_tokens(), 40 + 1 + 30 + 1);
  const auto first = c.train_sequence(0);
  for (std::int64_t i = 0; i < 8; ++i) EXPECT_EQ(first[static_cast<std::size_t>(i)], doc.data<std::int64_t>()[i]);
  EXPECT_EQ(c.train_sequence(5)[0], 2);  // token 40: a.npy's EOS
  EXPECT_EQ(c.train_sequence(5)[1], 3);  // then b.npy

  auto message = [&](const tensor& t) {
    write_npy(npy / "bad.npy", t);
    try {
      token_corpus::build({{npy / "bad.npy", npy / "a.npy"}, 8, 0.1, 4096}, *tok, 2);
    } catch (const input_error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  tensor out_of_vocab = tensor::empty({5}, dtype::i32);
  for (int i = 0; i < 5; ++i) out_of_vocab.data<std::int32_t>()[i] = i == 3 ? 5000 : 7;
  EXPECT_NE(message(out_of_vocab).find("token id 5000 at 3 is outside the model's vocabulary of 4096"), std::string::npos);
  EXPECT_NE(message(tensor::zeros({2, 3}, dtype::i32)).find("must be a 1-D int32 or int64 array"), std::string::npos);
  EXPECT_NE(message(tensor::zeros({4}, dtype::f32)).find("must be a 1-D int32 or int64 array"), std::string::npos);
}

TEST_F(training_data, order_is_a_permutation_per_epoch_and_resumes_exactly) {
  sequence_order a(50, 7);
  std::set<std::int64_t> first_epoch;
  std::vector<std::int64_t> seq;
  for (int i = 0; i < 120; ++i) {
    seq.push_back(a.next());
    if (i < 50) first_epoch.insert(seq.back());
  }
  EXPECT_EQ(first_epoch.size(), 50u);
  EXPECT_EQ(a.position().epoch, 2);
  sequence_order b(50, 7, {1, 13});  // resumed in the second epoch
  for (int i = 63; i < 120; ++i) ASSERT_EQ(b.next(), seq[static_cast<std::size_t>(i)]);
  sequence_order other(50, 8);
  int same = 0;
  for (int i = 0; i < 50; ++i) same += other.next() == seq[static_cast<std::size_t>(i)];
  EXPECT_LT(same, 10);
}

TEST_F(training_data, bad_sources_say_what_is_wrong) {
  auto message = [&](corpus_options o) {
    try {
      token_corpus::build(o, *tok, 2);
    } catch (const input_error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(message({{dir / "missing.txt"}, 16, 0.1}).find("does not exist"), std::string::npos);
  std::filesystem::create_directories(dir / "empty");
  EXPECT_NE(message({{dir / "empty"}, 16, 0.1}).find("holds no files"), std::string::npos);
  std::ofstream(dir / "empty.txt").close();
  EXPECT_NE(message({{dir / "empty.txt"}, 16, 0.1}).find("is empty"), std::string::npos);
  std::ofstream(dir / "tiny.txt") << "too short";
  EXPECT_NE(message({{dir / "tiny.txt"}, 16, 0.1}).find("too few"), std::string::npos);
}

}  // namespace
}  // namespace troupe
