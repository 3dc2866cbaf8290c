// Training throughput of the GPU stage (training/cuda) on one GPU: random tokens, one micro-batch
// of SEQUENCES x SEQ_LEN a step, each step the whole of what `troupe train` does on a stage:
// forward, loss and backward, the gradient norm and its clip, AdamW, zero_grad, the router bias
// update. Two warm-up steps, then STEPS timed.
//   troupe_bench_cuda_train CONFIG_JSON SEQUENCES SEQ_LEN STEPS [tf32|f32] [--profile]
// First, the roof of the GEMMs themselves: cuBLAS TFLOP/s of the model's largest training GEMM
// shape (the dense MLP's gate projection, SEQUENCES x SEQ_LEN rows) with float32 operands in each
// math and with bf16 operands (what a bf16 stage would reach). --profile brackets the first timed
// step with cudaProfilerStart/Stop (ncu --profile-from-start off sees one step).
// Then one JSON line: tokens/s, ms a step, the losses, the model FLOPs a token and the MFU
// against the H100 SXM's dense peak for the math used (TF32 495 TFLOP/s, FP32 67) and against
// the bf16 peak (989), the figure mixed-precision trainers quote.
// Model FLOPs a token: 6 x the parameters a token multiplies by (every matrix but the tables;
// the routed experts at the share of top-k slots that went to routed experts in this run) plus
// the causal attention's 3 x 2 x heads x (qk + v) x (SEQ_LEN + 1) / 2 per MLA layer.
#include <cublas_v2.h>
#include <cuda_profiler_api.h>
#include <cuda_runtime_api.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <string>

#include "gpu/cuda/cublas_check.hpp"
#include "gpu/cuda/cuda_check.hpp"

#include "model/config.hpp"
#include "model/sampler.hpp"
#include "training/cuda/cuda_stage.hpp"
#include "training/optimizer.hpp"

using namespace troupe;

namespace {

// TFLOP/s of y[m, n] = x[m, k] . w[n, k]^T in cuBLAS with the given operand type and compute type.
double gemm_rate(std::int64_t m, std::int64_t k, std::int64_t n, cudaDataType operands, cublasComputeType_t compute) {
  cublasHandle_t blas;
  TROUPE_CUBLAS_CHECK(cublasCreate(&blas));
  const std::size_t elem = operands == CUDA_R_32F ? 4 : 2;
  void *x = nullptr, *w = nullptr, *y = nullptr;
  TROUPE_CUDA_CHECK(cudaMalloc(&x, static_cast<std::size_t>(m * k) * elem));
  TROUPE_CUDA_CHECK(cudaMalloc(&w, static_cast<std::size_t>(n * k) * elem));
  TROUPE_CUDA_CHECK(cudaMalloc(&y, static_cast<std::size_t>(m * n) * 4));
  TROUPE_CUDA_CHECK(cudaMemset(x, 0, static_cast<std::size_t>(m * k) * elem));
  TROUPE_CUDA_CHECK(cudaMemset(w, 0, static_cast<std::size_t>(n * k) * elem));
  const float alpha = 1, beta = 0;
  auto run = [&] {
    TROUPE_CUBLAS_CHECK(cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n), static_cast<int>(m),
                                     static_cast<int>(k), &alpha, w, operands, static_cast<int>(k), x, operands,
                                     static_cast<int>(k), &beta, y, CUDA_R_32F, static_cast<int>(n), compute,
                                     CUBLAS_GEMM_DEFAULT));
  };
  run();
  TROUPE_CUDA_CHECK(cudaDeviceSynchronize());
  const int reps = 20;
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < reps; ++i) run();
  TROUPE_CUDA_CHECK(cudaDeviceSynchronize());
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  cudaFree(x);
  cudaFree(w);
  cudaFree(y);
  cublasDestroy(blas);
  return 2.0 * static_cast<double>(m) * static_cast<double>(k) * static_cast<double>(n) * reps / s / 1e12;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 5) {
    std::fprintf(stderr, "usage: troupe_bench_cuda_train CONFIG_JSON SEQUENCES SEQ_LEN STEPS [tf32|f32]\n");
    return 2;
  }
  try {
    const model_config c = load_model_config(argv[1]);
    const train::batch_dims dims{std::stoll(argv[2]), std::stoll(argv[3])};
    const int steps = std::stoi(argv[4]);
    const std::string math_name = argc > 5 ? argv[5] : "tf32";
    const bool profile = argc > 6 && std::string(argv[6]) == "--profile";
    {
      const std::int64_t m = dims.rows(), k = c.hidden_size, n = c.ffn_hidden_size;
      std::fprintf(stderr, "GEMM %lld x %lld x %lld TFLOP/s: f32 %.1f, tf32 %.1f, f32 operands as bf16 %.1f, bf16 operands %.1f\n",
                   static_cast<long long>(m), static_cast<long long>(k), static_cast<long long>(n),
                   gemm_rate(m, k, n, CUDA_R_32F, CUBLAS_COMPUTE_32F), gemm_rate(m, k, n, CUDA_R_32F, CUBLAS_COMPUTE_32F_FAST_TF32),
                   gemm_rate(m, k, n, CUDA_R_32F, CUBLAS_COMPUTE_32F_FAST_16BF), gemm_rate(m, k, n, CUDA_R_16BF, CUBLAS_COMPUTE_32F));
    }
    const train::gemm_math math = train::parse_gemm_math(math_name);
    train::cuda_stage stage(c, train::stage_range::split(c.num_layers, 1, 0), math);
    stage.init(1);
    train::optimizer_config oc;
    oc.warmup_steps = 2;
    oc.total_steps = steps + 2;

    rng gen(3);
    const float weight = 1.0f / static_cast<float>(dims.rows());
    double first_loss = 0, last_loss = 0, seconds = 0;
    std::int64_t routed_slots = 0, all_slots = 0;
    for (int step = 1; step <= steps + 2; ++step) {
      std::vector<std::int32_t> tokens(static_cast<std::size_t>(dims.rows())), targets(tokens.size());
      for (std::size_t i = 0; i < tokens.size(); ++i) {
        tokens[i] = static_cast<std::int32_t>(3 + gen.next() % static_cast<std::uint64_t>(c.vocab_size - 3));
        targets[i] = static_cast<std::int32_t>(3 + gen.next() % static_cast<std::uint64_t>(c.vocab_size - 3));
      }
      if (profile && step == 3) TROUPE_CUDA_CHECK(cudaProfilerStart());
      const auto start = std::chrono::steady_clock::now();
      std::vector<float> unused;
      const double loss = stage.forward_loss(step, tokens, {}, targets, dims, weight, train::keep_activations::yes, unused);
      const double norm = std::sqrt(stage.grad_square_sum());
      stage.step(oc, step, train::learning_rate_at(oc, step), train::clip_factor(oc, norm));
      stage.update_router_biases(oc.router_bias_rate);
      for (const auto& block : stage.expert_load())
        for (std::size_t e = 0; e < block.size(); ++e) {
          all_slots += block[e];
          if (static_cast<std::int64_t>(e) < c.n_routed_experts) routed_slots += block[e];
        }
      stage.zero_grad();
      stage.reset_expert_load();
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      if (profile && step == 3) TROUPE_CUDA_CHECK(cudaProfilerStop());
      if (step > 2) seconds += s;
      if (step == 1) first_loss = loss;
      last_loss = loss;
      std::fprintf(stderr, "step %d loss %.4f grad norm %.3f %.1f ms\n", step, loss, norm, s * 1e3);
    }

    // Parameters a token multiplies by.
    double dense = 0, expert = 0;
    for (const auto& p : stage.parameters()) {
      if (p.role != train::param_role::matrix) continue;
      const double n = static_cast<double>(p.shape[0]) * static_cast<double>(p.shape.size() > 1 ? p.shape[1] : 1);
      (p.name.find(".experts.") != std::string::npos ? expert : dense) += n;
    }
    const double routed_per_token = static_cast<double>(routed_slots) / static_cast<double>(all_slots) *
                                    static_cast<double>(c.moe_topk);
    const double active = dense + expert / static_cast<double>(c.n_routed_experts) * routed_per_token;
    const double attention = 3.0 * 2.0 * static_cast<double>(c.num_attention_heads) *
                             static_cast<double>(c.qk_head_dim() + c.v_head_dim) * (static_cast<double>(dims.seq_len) + 1) /
                             2.0 * 2.0 * static_cast<double>(c.num_layers);
    const double flops_per_token = 6.0 * active + attention;
    const double tokens_per_s = static_cast<double>(steps) * static_cast<double>(dims.rows()) / seconds;
    const double peak = math == train::gemm_math::tf32 ? 494.5e12 : 66.9e12, bf16_peak = 989e12;
    std::printf(
        "{\"math\": \"%s\", \"tokens_per_s\": %.1f, \"step_ms\": %.2f, \"first_loss\": %.4f, \"last_loss\": %.4f, "
        "\"parameters\": %lld, \"active_parameters\": %.0f, \"flops_per_token\": %.4g, \"mfu\": %.4f, \"mfu_of_bf16_peak\": %.4f, "
        "\"device_bytes\": %zu}\n",
        math_name.c_str(), tokens_per_s, seconds / steps * 1e3, first_loss, last_loss,
        static_cast<long long>(stage.parameter_count()), active, flops_per_token, tokens_per_s * flops_per_token / peak,
        tokens_per_s * flops_per_token / bf16_peak, stage.device_bytes());
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "troupe_bench_cuda_train: %s\n", e.what());
    return 1;
  }
}
