// The training backward of every layer against central finite differences in float64, on
// small random configs covering each mode (n-gram and plain embeddings, amplification, q-LoRA
// or not, YaRN), and the float32 training forward against the inference forward pass.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "gpu/cpu/cpu_backend.hpp"
#include "model/model.hpp"
#include "model/sampler.hpp"
#include "test_support.hpp"
#include "training/checkpoint_io.hpp"
#include "training/stage_model.hpp"

namespace troupe {
namespace {

using train::batch_dims;
using train::keep_activations;
using train::stage_model;
using train::stage_range;

// Training init plus noise on the norms and the router bias, so neither is a trivial 1 or 0.
void randomize(stage_model<double>& m, std::uint64_t seed) {
  m.init(seed);
  rng gen(seed + 7);
  for (auto& p : m.parameters()) {
    if (p.role == train::param_role::norm)
      for (auto& v : p.value) v = 1.0 + 0.2 * gen.normal();
    if (p.role == train::param_role::router_bias)
      for (auto& v : p.value) v = 0.05 * gen.normal();
  }
}

double loss_of(stage_model<double>& m, const test::training_batch& b) {
  train::buffer<double> unused;
  const auto h = m.forward(0, b.tokens, {}, b.dims, keep_activations::no);
  return m.loss(0, h, b.targets, b.dims, 1.0 / static_cast<double>(b.dims.rows()), keep_activations::no, unused);
}

void check_gradients(const model_config& config) {
  stage_model<double> m(config, stage_range::split(config.num_layers, 1, 0));
  randomize(m, 11);
  const test::training_batch b = test::random_training_batch(config, 2, 7, 5);
  m.zero_grad();
  train::buffer<double> grad_in;
  const auto h = m.forward(0, b.tokens, {}, b.dims, keep_activations::yes);
  m.loss(0, h, b.targets, b.dims, 1.0 / static_cast<double>(b.dims.rows()), keep_activations::yes, grad_in);
  EXPECT_TRUE(grad_in.empty());
  EXPECT_EQ(m.activations_held(), 0u);

  std::mt19937_64 pick(3);
  int checked = 0;
  for (auto& p : m.parameters()) {
    if (p.role == train::param_role::router_bias) continue;  // moved by the balancing rule, not by gradients
    std::vector<std::size_t> entries;
    // The largest gradient, plus random entries (from touched rows for the sparse tables).
    std::size_t biggest = 0;
    for (std::size_t i = 0; i < p.grad.size(); ++i)
      if (std::abs(p.grad[i]) > std::abs(p.grad[biggest])) biggest = i;
    entries.push_back(biggest);
    for (int k = 0; k < 3; ++k) entries.push_back(pick() % p.value.size());
    for (auto i : entries) {
      const double saved = p.value[i], step = 1e-6 * std::max(1.0, std::abs(saved));
      p.value[i] = saved + step;
      const double up = loss_of(m, b);
      p.value[i] = saved - step;
      const double down = loss_of(m, b);
      p.value[i] = saved;
      const double numeric = (up - down) / (2 * step), analytic = p.grad[i];
      // Central differences in float64 are good to ~1e-9 here; 1e-6 absolute + 1e-5 relative
      // leaves room for that and nothing for a wrong term.
      EXPECT_NEAR(analytic, numeric, 1e-6 + 1e-5 * std::abs(numeric)) << p.name << "[" << i << "]";
      ++checked;
    }
  }
  EXPECT_GT(checked, 100);
}

TEST(training_gradients, ngram_model_matches_finite_differences) { check_gradients(test::tiny_config()); }

TEST(training_gradients, plain_embedding_without_q_lora) {
  check_gradients(test::tiny_config(R"("q_lora_rank": null)", false));
}

TEST(training_gradients, yarn_and_unscaled_lora) {
  check_gradients(test::tiny_config(
      R"("rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "mscale_all_dim": 1.0},
         "mla_scale_q_lora": false, "mla_scale_kv_lora": false)"));
}

TEST(training_gradients, embedding_amplification_sqrt_and_layer_norm) {
  check_gradients(test::tiny_config(R"("embedding_amplification": "sqrt_hidden")"));
  check_gradients(test::tiny_config(R"("embedding_amplification": "layer_norm")"));
}

// Two stages chained by hand give the single stage's loss and every gradient.
TEST(training_gradients, pipeline_stages_compose_to_the_whole_model) {
  const model_config c = test::tiny_config(R"("num_layers": 3)");
  stage_model<double> whole(c, stage_range::split(3, 1, 0));
  stage_model<double> first(c, stage_range::split(3, 2, 0)), second(c, stage_range::split(3, 2, 1));
  randomize(whole, 4);
  for (auto* s : {&first, &second})
    for (auto& p : s->parameters()) p.value = whole.parameter_named(p.name).value;
  const test::training_batch b = test::random_training_batch(c, 2, 6, 9);
  const double w = 1.0 / static_cast<double>(b.dims.rows());
  train::buffer<double> g;
  const double expected = whole.loss(0, whole.forward(0, b.tokens, {}, b.dims, keep_activations::yes), b.targets, b.dims,
                                     w, keep_activations::yes, g);
  const auto mid = first.forward(7, b.tokens, {}, b.dims, keep_activations::yes);
  train::buffer<double> g_mid;
  const double got = second.loss(7, second.forward(7, {}, mid, b.dims, keep_activations::yes), b.targets, b.dims, w,
                                 keep_activations::yes, g_mid);
  ASSERT_EQ(g_mid.size(), mid.size());
  EXPECT_TRUE(first.backward(7, g_mid, b.dims).empty());
  EXPECT_NEAR(got, expected, 1e-12);
  for (auto* s : {&first, &second})
    for (auto& p : s->parameters()) {
      const auto& ref = whole.parameter_named(p.name).grad;
      for (std::size_t i = 0; i < ref.size(); ++i) ASSERT_NEAR(p.grad[i], ref[i], 1e-12 + 1e-9 * std::abs(ref[i])) << p.name;
    }
}

// The float32 training forward computes the inference function: the loss from the training
// stage equals the cross-entropy of the inference model's logits for the exported weights.
TEST(training_forward, equals_the_inference_forward_pass) {
  for (const char* overrides : {"", R"("embedding_amplification": "layer_norm")"}) {
    const model_config c = test::tiny_config(overrides);
    stage_model<float> m(c, stage_range::split(c.num_layers, 1, 0));
    m.init(21);
    const auto dir = test::temp_dir("train_vs_infer");
    train::write_model_files(dir, c, train::values_of(m), dtype::f32, {});
    cpu_backend be(1);
    auto inference = model::load(dir, be);
    test::training_batch b = test::random_training_batch(c, 1, 12, 8);
    b.targets[5] = b.targets[4];
    sequence_state state;
    const step_input in{&state, b.tokens};
    const tensor logits = inference->forward({&in, 1}, logits_mode::all_tokens);
    double expected = 0;
    for (std::int64_t r = 0; r < b.dims.rows(); ++r) {
      const float* l = logits.data<float>() + r * c.vocab_size;
      double mx = l[0], sum = 0;
      for (std::int64_t v = 0; v < c.vocab_size; ++v) mx = std::max(mx, static_cast<double>(l[v]));
      for (std::int64_t v = 0; v < c.vocab_size; ++v) sum += std::exp(l[v] - mx);
      expected += mx + std::log(sum) - l[b.targets[static_cast<std::size_t>(r)]];
    }
    train::buffer<float> unused;
    const auto h = m.forward(0, b.tokens, {}, b.dims, keep_activations::no);
    const double got = m.loss(0, h, b.targets, b.dims, 1.0f, keep_activations::no, unused);
    EXPECT_NEAR(got, expected, 1e-4 * std::abs(expected)) << overrides;  // float32 rounding of two paths
  }
}

}  // namespace
}  // namespace troupe
