// The GPU training stage against the CPU one (training/stage_model, itself checked against
// finite differences in tests/training_layers_test.cpp): the same parameters give the same
// hidden states, loss, every parameter gradient, touched table rows and AdamW update, by
// relative L2 error: float32 GEMMs under 1e-4 (summation order differs), TF32 tensor-core GEMMs
// (10-bit mantissas) under 3e-2; AdamW on the same gradients under 1e-6. Covers each model mode (n-gram and plain embeddings, q-LoRA or not, YaRN,
// amplification), widths past one thread block, pipeline stages and the replica all-reduce.
// Skips on machines without a GPU.
#include <gtest/gtest.h>

#include <cmath>
#include <map>

#include "gpu/cuda/cuda_backend.hpp"
#include "protocol/errors.hpp"
#include "model/sampler.hpp"
#include "tests/test_support.hpp"
#include "training/cuda/cuda_stage.hpp"
#include "training/optimizer.hpp"
#include "training/stage_model.hpp"

namespace troupe {
namespace {

using train::batch_dims;
using train::cuda_stage;
using train::gemm_math;
using train::keep_activations;
using train::stage_model;
using train::stage_range;

#define SKIP_WITHOUT_GPU() \
  if (!cuda_backend::available()) GTEST_SKIP() << "no CUDA device"

// Training init plus noise on the norms and the router bias, so neither is a trivial 1 or 0.
std::vector<train::named_array> random_values(stage_model<float>& m, std::uint64_t seed) {
  m.init(seed);
  rng gen(seed + 7);
  std::vector<train::named_array> out;
  for (auto& p : m.parameters()) {
    if (p.role == train::param_role::norm)
      for (auto& v : p.value) v = static_cast<float>(1.0 + 0.2 * gen.normal());
    if (p.role == train::param_role::router_bias)
      for (auto& v : p.value) v = static_cast<float>(0.05 * gen.normal());
    out.push_back({p.name, p.shape, p.value});
  }
  return out;
}

double rel(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  return test::relative_l2(a.data(), b.data(), std::min(a.size(), b.size()));
}

// One micro-batch forward + loss + backward on both, then the comparisons and one AdamW step.
void check_against_cpu(const model_config& c, gemm_math math, double tol, std::int64_t sequences, std::int64_t seq_len) {
  const stage_range whole = stage_range::split(c.num_layers, 1, 0);
  stage_model<float> cpu(c, whole);
  cuda_stage gpu(c, whole, math);
  gpu.set_values(random_values(cpu, 11));
  const test::training_batch b = test::random_training_batch(c, sequences, seq_len, 5);
  const float weight = 1.0f / static_cast<float>(b.dims.rows());

  const auto h_cpu = cpu.forward(0, b.tokens, {}, b.dims, keep_activations::yes);
  const auto h_gpu = gpu.forward(0, b.tokens, {}, b.dims, keep_activations::yes);
  EXPECT_LT(rel(h_gpu, h_cpu), tol) << "hidden states";
  train::buffer<float> unused_cpu;
  std::vector<float> unused_gpu;
  const double loss_cpu = cpu.loss(0, h_cpu, b.targets, b.dims, weight, keep_activations::yes, unused_cpu);
  const double loss_gpu = gpu.loss(0, h_gpu, b.targets, b.dims, weight, keep_activations::yes, unused_gpu);
  EXPECT_LT(std::abs(loss_gpu - loss_cpu) / std::abs(loss_cpu), tol) << loss_gpu << " vs " << loss_cpu;
  EXPECT_EQ(gpu.activations_held(), 0u);

  std::map<std::string, const train::parameter<float>*> by_name;
  for (const auto& p : cpu.parameters()) by_name[p.name] = &p;
  for (const auto& g : gpu.gradients()) {
    const auto& p = *by_name.at(g.name);
    double norm = 0;
    for (float v : p.grad) norm += static_cast<double>(v) * v;
    ASSERT_GT(norm, 0.0) << g.name << " got no gradient on the CPU";
    EXPECT_LT(rel(g.values, p.grad), tol) << g.name;
  }
  std::size_t t = 0;
  const auto touched = gpu.touched();
  for (const auto& p : cpu.parameters())
    if (p.role == train::param_role::table) EXPECT_EQ(touched.at(t++), p.touched) << p.name;
  const auto load = gpu.expert_load();
  EXPECT_EQ(load, cpu.expert_load());

  train::adamw opt(cpu.parameters());
  EXPECT_LT(std::abs(gpu.grad_square_sum() - opt.grad_square_sum()) / opt.grad_square_sum(), tol);
  // AdamW on the same gradients (its first step is ~lr * sign(g): gradients that differ in their
  // last bits would flip the update of near-zero elements), so the update itself is compared.
  std::vector<train::named_array> cpu_grads;
  std::vector<std::vector<std::uint8_t>> cpu_touched;
  for (const auto& p : cpu.parameters()) {
    if (p.role == train::param_role::router_bias) continue;
    cpu_grads.push_back({p.name, p.shape, p.grad});
    if (p.role == train::param_role::table) cpu_touched.push_back(p.touched);
  }
  gpu.add_gradients(cpu_grads, cpu_touched, true);
  const train::optimizer_config oc;
  for (std::int64_t step = 1; step <= 2; ++step) {
    opt.step(oc, step, 1e-2, 0.5);
    gpu.step(oc, step, 1e-2, 0.5);
  }
  std::map<std::string, std::vector<float>> after;
  for (auto& v : gpu.values()) after[v.name] = std::move(v.values);
  for (const auto& p : cpu.parameters()) EXPECT_LT(rel(after.at(p.name), p.value), 1e-6) << p.name << " after AdamW";
}

TEST(cuda_training, ngram_model_matches_the_cpu_stage) {
  SKIP_WITHOUT_GPU();
  check_against_cpu(test::tiny_config(), gemm_math::f32, 1e-4, 2, 12);
}

TEST(cuda_training, plain_embedding_yarn_and_amplification_match) {
  SKIP_WITHOUT_GPU();
  check_against_cpu(test::tiny_config(R"("q_lora_rank": null)", false), gemm_math::f32, 1e-4, 2, 9);
  check_against_cpu(test::tiny_config(
                        R"("rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "mscale_all_dim": 1.0},
                           "mla_scale_q_lora": false, "mla_scale_kv_lora": false)"),
                    gemm_math::f32, 1e-4, 1, 20);
  check_against_cpu(test::tiny_config(R"("embedding_amplification": "sqrt_hidden")"), gemm_math::f32, 1e-4, 2, 8);
  check_against_cpu(test::tiny_config(R"("embedding_amplification": "layer_norm")"), gemm_math::f32, 1e-4, 2, 8);
}

// Rows, widths and sequences past one thread block of every kernel (256) and several chunks.
TEST(cuda_training, wide_model_and_long_sequences_match) {
  SKIP_WITHOUT_GPU();
  const auto c = test::tiny_config(
      R"("hidden_size": 320, "vocab_size": 700, "ffn_hidden_size": 640, "kv_lora_rank": 64, "q_lora_rank": 96,
         "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32, "num_attention_heads": 4,
         "expert_ffn_hidden_size": 96, "n_routed_experts": 8, "zero_expert_num": 4, "moe_topk": 4)");
  check_against_cpu(c, gemm_math::f32, 1e-4, 3, 300);
}

TEST(cuda_training, tf32_tensor_cores_stay_within_tf32_error) {
  SKIP_WITHOUT_GPU();
  check_against_cpu(test::tiny_config(R"("hidden_size": 128)"), gemm_math::tf32, 3e-2, 2, 64);
}

// Two GPU stages chained through host arrays give the whole GPU model's loss and gradients (its
// forward_loss keeps the hidden states on the device); a
// second replica's gradients summed in (add_gradients) double every gradient.
TEST(cuda_training, pipeline_stages_and_replica_sums) {
  SKIP_WITHOUT_GPU();
  const model_config c = test::tiny_config(R"("num_layers": 3)");
  stage_model<float> cpu(c, stage_range::split(3, 1, 0));
  const auto values = random_values(cpu, 4);
  cuda_stage whole(c, stage_range::split(3, 1, 0), gemm_math::f32);
  cuda_stage first(c, stage_range::split(3, 2, 0), gemm_math::f32), second(c, stage_range::split(3, 2, 1), gemm_math::f32);
  for (auto* s : {&whole, &first, &second}) {
    std::vector<train::named_array> mine;
    for (const auto& spec : s->parameters())
      for (const auto& v : values)
        if (v.name == spec.name) mine.push_back(v);
    s->set_values(mine);
  }
  const test::training_batch b = test::random_training_batch(c, 2, 10, 9);
  const float w = 1.0f / static_cast<float>(b.dims.rows());
  std::vector<float> unused, grad_in;
  const double l_whole = whole.forward_loss(0, b.tokens, {}, b.targets, b.dims, w, keep_activations::yes, unused);
  const auto mid = first.forward(0, b.tokens, {}, b.dims, keep_activations::yes);
  const double l_split = second.loss(0, second.forward(0, {}, mid, b.dims, keep_activations::yes), b.targets, b.dims, w,
                                     keep_activations::yes, grad_in);
  EXPECT_TRUE(first.backward(0, grad_in, b.dims).empty());
  EXPECT_LT(std::abs(l_split - l_whole) / l_whole, 1e-5);
  std::map<std::string, std::vector<float>> split;
  for (auto* s : {&first, &second})
    for (auto& g : s->gradients()) split[g.name] = std::move(g.values);
  const auto grads = whole.gradients();
  for (const auto& g : grads) EXPECT_LT(rel(split.at(g.name), g.values), 1e-5) << g.name;

  whole.add_gradients(grads, whole.touched(), false);
  for (const auto& g : whole.gradients()) {
    auto twice = split.at(g.name);
    for (auto& v : twice) v *= 2;
    EXPECT_LT(rel(g.values, twice), 1e-5) << g.name;
  }
}

TEST(cuda_training, bad_inputs_are_refused) {
  SKIP_WITHOUT_GPU();
  const model_config c = test::tiny_config();
  cuda_stage gpu(c, stage_range::split(c.num_layers, 1, 0), gemm_math::f32);
  test::training_batch b = test::random_training_batch(c, 1, 8, 3);
  b.tokens[2] = static_cast<std::int32_t>(c.vocab_size);
  EXPECT_THROW(gpu.forward(0, b.tokens, {}, b.dims, keep_activations::yes), input_error);
  EXPECT_THROW(gpu.backward(7, std::vector<float>(8 * 48), b.dims), std::logic_error);
  std::vector<train::named_array> values = gpu.values();
  values[1].shape[0] += 1;
  EXPECT_THROW(gpu.set_values(values), input_error);
  EXPECT_THROW(train::parse_gemm_math("bf16"), input_error);
}

}  // namespace
}  // namespace troupe
