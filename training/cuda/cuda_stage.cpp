#include "training/cuda/cuda_stage.hpp"

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>

#include "gpu/cuda/cublas_check.hpp"
#include "gpu/cuda/cuda_check.hpp"
#include "model/ngram_hash.hpp"
#include "model/rope.hpp"
#include "model/weights.hpp"
#include "protocol/errors.hpp"
#include "training/cuda/device_array.hpp"
#include "training/cuda/device_group.hpp"
#include "training/cuda/train_kernels.hpp"

namespace troupe::train {
namespace k = cuda;

gemm_math parse_gemm_math(const std::string& name) {
  if (name == "f32") return gemm_math::f32;
  if (name == "tf32") return gemm_math::tf32;
  throw input_error("unknown GEMM math \"" + name + "\" (f32 or tf32)");
}

namespace {

using device_floats = device_array<float>;

struct device_param {
  parameter_spec spec;
  std::int64_t rows = 0, cols = 0;
  device_floats value, grad, m, v;                // m, v: not for router biases
  device_array<std::uint8_t> touched;            // tables only
  std::int64_t numel() const { return rows * cols; }
};

// What each layer's backward needs from its forward (device arrays; inputs are owned by the
// block's cache and passed in again).
struct norm_cache {
  device_floats y, rms_inv;
};
struct mlp_cache {
  device_floats gate, up, act;
};
struct mla_cache {
  device_floats q_lat, q_rms, q_ln, q, kv, kv_rms, k_lat, kvb, attn, lse;
};
struct moe_cache {
  device_floats probs, gates, x, y;                     // x, y: every routed row of every expert, expert by expert
  device_array<std::int32_t> idx, rows, slots;         // rows, slots: the same order
  std::vector<std::int64_t> offsets;           // expert e's rows are [offsets[e], offsets[e + 1])
  mlp_cache experts;                           // gate / up / act of all routed rows, same order
};
struct block_cache {
  device_floats h, a, b, c;  // the block's input and its residual stream after each sublayer
  norm_cache n0, p0, n1, p1;
  mla_cache attention[2];
  mlp_cache mlp[2];
  moe_cache moe;
};
struct embedding_cache {
  device_array<std::int64_t> tokens, ngram_ids;  // [T], [T, tables]
  std::vector<device_floats> gathered;            // per table [T, d]
  device_floats out, std_inv;                     // layer-norm amplification only
};
struct saved_batch {
  embedding_cache embedding;
  std::vector<block_cache> blocks;
};

}  // namespace

struct cuda_stage::impl {
  model_config config;
  stage_range range;
  gemm_math math;
  int device;
  std::shared_ptr<device_group> group;
  int rank = 0;
  cudaStream_t stream = nullptr;
  cublasHandle_t blas = nullptr;
  void* workspace = nullptr;
  std::vector<parameter_spec> specs;
  std::vector<device_param> params;  // checkpoint order
  std::map<std::string, device_param*> by_name;
  std::map<std::int64_t, saved_batch> saved;
  std::vector<std::vector<std::int64_t>> expert_load;
  device_floats rope_cos, rope_sin;
  std::int64_t rope_rows = -1, rope_seq_len = -1;
  float softmax_scale = 1;

  // ---- parameters ------------------------------------------------------------------------
  device_param& param(const std::string& name) {
    auto it = by_name.find(name);
    if (it == by_name.end()) throw std::logic_error("cuda_stage: no parameter " + name + " on this stage");
    return *it->second;
  }
  const float* w(const std::string& name) { return param(name).value.get(); }
  float* g(const std::string& name) { return param(name).grad.get(); }

  // ---- GEMMs -----------------------------------------------------------------------------
  cublasComputeType_t compute() const {
    return math == gemm_math::tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
  }
  // Row-major C[m, n] = op(A) op(B) + beta C, as train::matmul: cuBLAS sees the transposes
  // (column-major C^T = op(B)^T op(A)^T).
  void matmul(bool ta, bool tb, std::int64_t m, std::int64_t n, std::int64_t kk, const float* a, std::int64_t lda,
              const float* b, std::int64_t ldb, float beta, float* c, std::int64_t ldc) {
    if (m == 0 || n == 0) return;
    const float alpha = 1;
    TROUPE_CUBLAS_CHECK(cublasGemmEx(blas, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N,
                                     static_cast<int>(n), static_cast<int>(m), static_cast<int>(kk), &alpha, b, CUDA_R_32F,
                                     static_cast<int>(ldb), a, CUDA_R_32F, static_cast<int>(lda), &beta, c, CUDA_R_32F,
                                     static_cast<int>(ldc), compute(), CUBLAS_GEMM_DEFAULT));
  }
  void matmul_batched(bool ta, bool tb, std::int64_t m, std::int64_t n, std::int64_t kk, const float* a,
                      std::int64_t lda, std::int64_t sa, const float* b, std::int64_t ldb, std::int64_t sb, float beta,
                      float* c, std::int64_t ldc, std::int64_t sc, std::int64_t batch) {
    const float alpha = 1;
    TROUPE_CUBLAS_CHECK(cublasGemmStridedBatchedEx(
        blas, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, static_cast<int>(n), static_cast<int>(m),
        static_cast<int>(kk), &alpha, b, CUDA_R_32F, static_cast<int>(ldb), sb, a, CUDA_R_32F, static_cast<int>(lda), sa,
        &beta, c, CUDA_R_32F, static_cast<int>(ldc), sc, static_cast<int>(batch), compute(), CUBLAS_GEMM_DEFAULT));
  }
  // y[M,N] = x[M,K] . w[N,K]^T
  void linear(const float* x, const float* wt, std::int64_t m, std::int64_t kk, std::int64_t n, float* y) {
    matmul(false, true, m, n, kk, x, kk, wt, kk, 0, y, n);
  }
  // dx[M,K] += dy . w (dx may be null); dw[N,K] += dy^T . x
  void linear_backward(const float* dy, const float* x, const float* wt, std::int64_t m, std::int64_t kk, std::int64_t n,
                       float* dx, float* dw) {
    if (dx) matmul(false, false, m, kk, n, dy, n, wt, kk, 1, dx, kk);
    matmul(true, false, n, kk, m, dy, n, x, kk, 1, dw, kk);
  }

  // ---- layers ----------------------------------------------------------------------------
  void norm_forward(const std::string& name, const float* x, std::int64_t rows, norm_cache& c) {
    const auto cols = config.hidden_size;
    c.y = device_floats(rows * cols, stream);
    c.rms_inv = device_floats(rows, stream);
    k::rms_norm_forward(x, w(name), rows, cols, cols, static_cast<float>(config.rms_norm_eps), 1.0f, c.y.get(),
                        c.rms_inv.get(), stream);
  }
  void norm_backward(const std::string& name, const float* dy, const float* x, const norm_cache& c, std::int64_t rows,
                     float* dx) {
    const auto cols = config.hidden_size;
    k::rms_norm_backward(dy, x, w(name), c.rms_inv.get(), rows, cols, cols, 1.0f, dx, g(name), stream);
  }

  // SwiGLU MLP of weights prefix{gate,up,down}_proj.weight: y = down(silu(gate x) * up x).
  device_floats mlp_forward(const std::string& prefix, const float* x, std::int64_t rows, mlp_cache& c, std::int64_t f) {
    const auto h = config.hidden_size;
    c.gate = device_floats(rows * f, stream);
    c.up = device_floats(rows * f, stream);
    c.act = device_floats(rows * f, stream);
    device_floats y(rows * h, stream);
    mlp_forward_into(prefix, x, rows, c.gate.get(), c.up.get(), c.act.get(), y.get(), f);
    return y;
  }
  void mlp_forward_into(const std::string& prefix, const float* x, std::int64_t rows, float* gate, float* up, float* act,
                        float* y, std::int64_t f) {
    const auto h = config.hidden_size;
    linear(x, w(prefix + "gate_proj.weight"), rows, h, f, gate);
    linear(x, w(prefix + "up_proj.weight"), rows, h, f, up);
    k::swiglu_forward(gate, up, act, rows * f, stream);
    linear(act, w(prefix + "down_proj.weight"), rows, f, h, y);
  }
  void mlp_backward(const std::string& prefix, const float* dy, const float* x, const float* gate, const float* up,
                    const float* act, std::int64_t rows, std::int64_t f, float* dx) {
    const auto h = config.hidden_size;
    device_floats dact(rows * f, stream), dgate(rows * f, stream), dup(rows * f, stream);
    TROUPE_CUDA_CHECK(cudaMemsetAsync(dact.get(), 0, static_cast<std::size_t>(rows * f) * sizeof(float), stream));
    linear_backward(dy, act, w(prefix + "down_proj.weight"), rows, f, h, dact.get(), g(prefix + "down_proj.weight"));
    k::swiglu_backward(dact.get(), gate, up, dgate.get(), dup.get(), rows * f, stream);
    linear_backward(dgate.get(), x, w(prefix + "gate_proj.weight"), rows, h, f, dx, g(prefix + "gate_proj.weight"));
    linear_backward(dup.get(), x, w(prefix + "up_proj.weight"), rows, h, f, dx, g(prefix + "up_proj.weight"));
  }

  float kv_scale() const {
    return config.mla_scale_kv_lora
               ? static_cast<float>(std::sqrt(static_cast<double>(config.hidden_size) / static_cast<double>(config.kv_lora_rank)))
               : 1.0f;
  }
  float q_scale() const {
    return static_cast<float>(std::sqrt(static_cast<double>(config.hidden_size) / static_cast<double>(config.q_lora_rank)));
  }

  // MLA over whole sequences, explicit form (training/layers.cpp's mla_layer).
  device_floats mla_forward(const std::string& p, const float* x, const batch_dims& dims, mla_cache& c) {
    const auto& cf = config;
    const auto t = dims.rows(), s = dims.seq_len, heads = cf.num_attention_heads, hidden = cf.hidden_size;
    const auto qk = cf.qk_head_dim(), nope = cf.qk_nope_head_dim, rope_dim = cf.qk_rope_head_dim, vd = cf.v_head_dim;
    const auto kvr = cf.kv_lora_rank, lat_w = kvr + rope_dim, kvb_w = nope + vd, half = rope_dim / 2;
    const float eps = static_cast<float>(cf.rms_norm_eps);
    c.q = device_floats(t * heads * qk, stream);
    if (cf.q_lora_rank) {
      const auto qr = cf.q_lora_rank;
      c.q_lat = device_floats(t * qr, stream);
      c.q_ln = device_floats(t * qr, stream);
      c.q_rms = device_floats(t, stream);
      linear(x, w(p + "q_a_proj.weight"), t, hidden, qr, c.q_lat.get());
      k::rms_norm_forward(c.q_lat.get(), w(p + "q_a_layernorm.weight"), t, qr, qr, eps, 1.0f, c.q_ln.get(), c.q_rms.get(),
                          stream);
      linear(c.q_ln.get(), w(p + "q_b_proj.weight"), t, qr, heads * qk, c.q.get());
      if (cf.mla_scale_q_lora) k::scale(c.q.get(), q_scale(), t * heads * qk, stream);
    } else {
      linear(x, w(p + "q_proj.weight"), t, hidden, heads * qk, c.q.get());
    }
    k::rope(c.q.get(), rope_cos.get(), rope_sin.get(), t, heads, qk, nope, half, false, stream);

    c.kv = device_floats(t * lat_w, stream);
    linear(x, w(p + "kv_a_proj_with_mqa.weight"), t, hidden, lat_w, c.kv.get());
    c.k_lat = device_floats::copy_of(c.kv.get(), t * lat_w, stream);
    c.kv_rms = device_floats(t, stream);
    k::rms_norm_forward(c.kv.get(), w(p + "kv_a_layernorm.weight"), t, kvr, lat_w, eps, kv_scale(), c.k_lat.get(),
                        c.kv_rms.get(), stream);
    k::rope(c.k_lat.get(), rope_cos.get(), rope_sin.get(), t, 1, lat_w, kvr, half, false, stream);
    c.kvb = device_floats(t * heads * kvb_w, stream);
    matmul(false, true, t, heads * kvb_w, kvr, c.k_lat.get(), lat_w, w(p + "kv_b_proj.weight"), kvr, 0, c.kvb.get(),
           heads * kvb_w);

    device_floats key(t * heads * qk, stream);
    k::assemble_keys(c.kvb.get(), c.k_lat.get(), t, heads, nope, rope_dim, vd, kvr, key.get(), stream);
    c.attn = device_floats(t * heads * vd, stream);
    c.lse = device_floats(t * heads, stream);
    device_floats probs(heads * s * s, stream);
    for (std::int64_t seq = 0; seq < dims.sequences; ++seq) {
      const auto r0 = seq * s;
      matmul_batched(false, true, s, s, qk, c.q.get() + r0 * heads * qk, heads * qk, qk, key.get() + r0 * heads * qk,
                     heads * qk, qk, 0, probs.get(), s, s * s, heads);
      k::causal_softmax(probs.get(), heads, s, softmax_scale, c.lse.get() + r0 * heads, stream);
      matmul_batched(false, false, s, vd, s, probs.get(), s, s * s, c.kvb.get() + r0 * heads * kvb_w + nope,
                     heads * kvb_w, kvb_w, 0, c.attn.get() + r0 * heads * vd, heads * vd, vd, heads);
    }
    device_floats out(t * hidden, stream);
    linear(c.attn.get(), w(p + "o_proj.weight"), t, heads * vd, hidden, out.get());
    return out;
  }

  void mla_backward(const std::string& p, const float* dy, const float* x, const mla_cache& c, const batch_dims& dims,
                    float* dx) {
    const auto& cf = config;
    const auto t = dims.rows(), s = dims.seq_len, heads = cf.num_attention_heads, hidden = cf.hidden_size;
    const auto qk = cf.qk_head_dim(), nope = cf.qk_nope_head_dim, rope_dim = cf.qk_rope_head_dim, vd = cf.v_head_dim;
    const auto kvr = cf.kv_lora_rank, lat_w = kvr + rope_dim, kvb_w = nope + vd, half = rope_dim / 2;

    device_floats dattn = device_floats::zeros(t * heads * vd, stream);
    linear_backward(dy, c.attn.get(), w(p + "o_proj.weight"), t, heads * vd, hidden, dattn.get(), g(p + "o_proj.weight"));
    device_floats delta(t * heads, stream);
    k::head_dots(dattn.get(), c.attn.get(), t, heads, vd, delta.get(), stream);

    device_floats key(t * heads * qk, stream);
    k::assemble_keys(c.kvb.get(), c.k_lat.get(), t, heads, nope, rope_dim, vd, kvr, key.get(), stream);
    auto dq = device_floats::zeros(t * heads * qk, stream), dkvb = device_floats::zeros(t * heads * kvb_w, stream);
    auto dk_lat = device_floats::zeros(t * lat_w, stream);
    device_floats dkey(t * heads * qk, stream);
    device_floats probs(heads * s * s, stream), dp(heads * s * s, stream);
    for (std::int64_t seq = 0; seq < dims.sequences; ++seq) {
      const auto r0 = seq * s;
      const float* q = c.q.get() + r0 * heads * qk;
      const float* kk = key.get() + r0 * heads * qk;
      const float* v = c.kvb.get() + r0 * heads * kvb_w + nope;
      const float* d_out = dattn.get() + r0 * heads * vd;
      matmul_batched(false, true, s, s, qk, q, heads * qk, qk, kk, heads * qk, qk, 0, probs.get(), s, s * s, heads);
      k::causal_softmax_recompute(probs.get(), c.lse.get() + r0 * heads, heads, s, softmax_scale, stream);
      // dP = dO V^T; dV += P^T dO
      matmul_batched(false, true, s, s, vd, d_out, heads * vd, vd, v, heads * kvb_w, kvb_w, 0, dp.get(), s, s * s, heads);
      matmul_batched(true, false, s, vd, s, probs.get(), s, s * s, d_out, heads * vd, vd, 1,
                     dkvb.get() + r0 * heads * kvb_w + nope, heads * kvb_w, kvb_w, heads);
      k::softmax_grad(probs.get(), dp.get(), delta.get(), r0, heads, s, softmax_scale, stream);
      // dQ += dS K; dK = dS^T Q
      matmul_batched(false, false, s, qk, s, dp.get(), s, s * s, kk, heads * qk, qk, 1, dq.get() + r0 * heads * qk,
                     heads * qk, qk, heads);
      matmul_batched(true, false, s, qk, s, dp.get(), s, s * s, q, heads * qk, qk, 0, dkey.get() + r0 * heads * qk,
                     heads * qk, qk, heads);
    }
    k::split_key_grad(dkey.get(), t, heads, nope, rope_dim, vd, kvr, dkvb.get(), dk_lat.get(), stream);

    // Key side: kv_b, then the latent's norm and the rope columns, then kv_a.
    matmul(false, false, t, kvr, heads * kvb_w, dkvb.get(), heads * kvb_w, w(p + "kv_b_proj.weight"), kvr, 0,
           dk_lat.get(), lat_w);
    matmul(true, false, heads * kvb_w, kvr, t, dkvb.get(), heads * kvb_w, c.k_lat.get(), lat_w, 1,
           g(p + "kv_b_proj.weight"), kvr);
    k::rope(dk_lat.get(), rope_cos.get(), rope_sin.get(), t, 1, lat_w, kvr, half, true, stream);
    device_floats dkv = device_floats::zeros(t * lat_w, stream);
    k::copy_columns(dk_lat.get() + kvr, lat_w, dkv.get() + kvr, lat_w, t, rope_dim, stream);
    k::rms_norm_backward(dk_lat.get(), c.kv.get(), w(p + "kv_a_layernorm.weight"), c.kv_rms.get(), t, kvr, lat_w,
                         kv_scale(), dkv.get(), g(p + "kv_a_layernorm.weight"), stream);
    linear_backward(dkv.get(), x, w(p + "kv_a_proj_with_mqa.weight"), t, hidden, lat_w, dx,
                    g(p + "kv_a_proj_with_mqa.weight"));

    // Query side.
    k::rope(dq.get(), rope_cos.get(), rope_sin.get(), t, heads, qk, nope, half, true, stream);
    if (cf.q_lora_rank) {
      const auto qr = cf.q_lora_rank;
      if (cf.mla_scale_q_lora) k::scale(dq.get(), q_scale(), t * heads * qk, stream);
      device_floats dq_ln = device_floats::zeros(t * qr, stream), dq_lat = device_floats::zeros(t * qr, stream);
      linear_backward(dq.get(), c.q_ln.get(), w(p + "q_b_proj.weight"), t, qr, heads * qk, dq_ln.get(),
                      g(p + "q_b_proj.weight"));
      k::rms_norm_backward(dq_ln.get(), c.q_lat.get(), w(p + "q_a_layernorm.weight"), c.q_rms.get(), t, qr, qr, 1.0f,
                           dq_lat.get(), g(p + "q_a_layernorm.weight"), stream);
      linear_backward(dq_lat.get(), x, w(p + "q_a_proj.weight"), t, hidden, qr, dx, g(p + "q_a_proj.weight"));
    } else {
      linear_backward(dq.get(), x, w(p + "q_proj.weight"), t, hidden, heads * qk, dx, g(p + "q_proj.weight"));
    }
  }

  // Router and experts (training/layers.cpp's moe_layer): the routing is computed on the device
  // and read back once (the expert GEMMs need each expert's row count on the host).
  device_floats moe_forward(const std::string& p, const float* u, std::int64_t rows, moe_cache& c, std::vector<std::int64_t>* load) {
    const auto& cf = config;
    const auto hidden = cf.hidden_size, e = cf.num_router_experts(), kk = cf.moe_topk, ef = cf.expert_ffn_hidden_size;
    const auto n_routed = static_cast<std::int32_t>(cf.n_routed_experts);
    c.probs = device_floats(rows * e, stream);
    linear(u, w(p + "router.classifier.weight"), rows, hidden, e, c.probs.get());
    c.idx = device_array<std::int32_t>(rows * kk, stream);
    c.gates = device_floats(rows * kk, stream);
    k::router_forward(c.probs.get(), w(p + "router.e_score_correction_bias"), rows, e, static_cast<int>(kk),
                      static_cast<float>(cf.routed_scaling_factor), c.idx.get(), c.gates.get(), stream);
    const std::vector<std::int32_t> idx = c.idx.download();

    std::vector<std::vector<std::int32_t>> by_expert_rows(static_cast<std::size_t>(n_routed)),
        by_expert_slots(static_cast<std::size_t>(n_routed));
    for (std::int64_t r = 0; r < rows; ++r)
      for (std::int64_t j = 0; j < kk; ++j) {
        const auto x = idx[static_cast<std::size_t>(r * kk + j)];
        if (load) ++(*load)[static_cast<std::size_t>(x)];
        if (x < n_routed) {
          by_expert_rows[static_cast<std::size_t>(x)].push_back(static_cast<std::int32_t>(r));
          by_expert_slots[static_cast<std::size_t>(x)].push_back(static_cast<std::int32_t>(j));
        }
      }
    std::vector<std::int32_t> all_rows, all_slots;
    c.offsets.assign(1, 0);
    for (std::int32_t x = 0; x < n_routed; ++x) {
      all_rows.insert(all_rows.end(), by_expert_rows[static_cast<std::size_t>(x)].begin(), by_expert_rows[static_cast<std::size_t>(x)].end());
      all_slots.insert(all_slots.end(), by_expert_slots[static_cast<std::size_t>(x)].begin(), by_expert_slots[static_cast<std::size_t>(x)].end());
      c.offsets.push_back(static_cast<std::int64_t>(all_rows.size()));
    }
    const auto total = static_cast<std::int64_t>(all_rows.size());
    c.rows = device_array<std::int32_t>::upload(all_rows, stream);
    c.slots = device_array<std::int32_t>::upload(all_slots, stream);
    c.x = device_floats(total * hidden, stream);
    c.y = device_floats(total * hidden, stream);
    c.experts.gate = device_floats(total * ef, stream);
    c.experts.up = device_floats(total * ef, stream);
    c.experts.act = device_floats(total * ef, stream);
    device_floats out(rows * hidden, stream);
    k::combine_zero_experts(u, c.idx.get(), c.gates.get(), rows, static_cast<int>(kk), n_routed, hidden, out.get(), stream);
    k::gather(u, c.rows.get(), total, hidden, c.x.get(), stream);
    for (std::int32_t x = 0; x < n_routed; ++x) {
      const auto o = c.offsets[static_cast<std::size_t>(x)], n = c.offsets[static_cast<std::size_t>(x) + 1] - o;
      if (n == 0) continue;
      mlp_forward_into(p + "experts." + std::to_string(x) + ".", c.x.get() + o * hidden, n, c.experts.gate.get() + o * ef,
                       c.experts.up.get() + o * ef, c.experts.act.get() + o * ef, c.y.get() + o * hidden, ef);
      k::combine_expert(c.y.get() + o * hidden, c.rows.get() + o, c.slots.get() + o, c.gates.get(), static_cast<int>(kk), n,
                        hidden, out.get(), stream);
    }
    return out;
  }

  void moe_backward(const std::string& p, const float* dy, const float* u, const moe_cache& c, std::int64_t rows,
                    float* du) {
    const auto& cf = config;
    const auto hidden = cf.hidden_size, e = cf.num_router_experts(), kk = cf.moe_topk, ef = cf.expert_ffn_hidden_size;
    const auto n_routed = static_cast<std::int32_t>(cf.n_routed_experts);
    const float scaling = static_cast<float>(cf.routed_scaling_factor);
    device_floats dprobs = device_floats::zeros(rows * e, stream);
    k::zero_experts_grad(dy, u, c.idx.get(), c.gates.get(), rows, static_cast<int>(kk), n_routed, e, hidden, scaling,
                         dprobs.get(), du, stream);
    const auto total = c.offsets.back();
    device_floats dexpert(total * hidden, stream), din = device_floats::zeros(total * hidden, stream);
    for (std::int32_t x = 0; x < n_routed; ++x) {
      const auto o = c.offsets[static_cast<std::size_t>(x)], n = c.offsets[static_cast<std::size_t>(x) + 1] - o;
      if (n == 0) continue;
      k::expert_grad(dy, c.y.get() + o * hidden, c.rows.get() + o, c.slots.get() + o, c.gates.get(), static_cast<int>(kk), n,
                     hidden, x, e, scaling, dprobs.get(), dexpert.get() + o * hidden, stream);
      mlp_backward(p + "experts." + std::to_string(x) + ".", dexpert.get() + o * hidden, c.x.get() + o * hidden,
                   c.experts.gate.get() + o * ef, c.experts.up.get() + o * ef, c.experts.act.get() + o * ef, n, ef,
                   din.get() + o * hidden);
      k::scatter_add(din.get() + o * hidden, c.rows.get() + o, n, hidden, du, stream);
    }
    // Softmax backward; the top-k choice itself has no gradient.
    device_floats dlogits(rows * e, stream);
    k::softmax_backward(c.probs.get(), dprobs.get(), rows, e, dlogits.get(), stream);
    linear_backward(dlogits.get(), u, w(p + "router.classifier.weight"), rows, hidden, e, du,
                    g(p + "router.classifier.weight"));
  }

  // ---- embedding, blocks, head -------------------------------------------------------------
  device_floats embedding_forward(std::span<const std::int32_t> tokens, const batch_dims& dims, embedding_cache& c) {
    const auto& cf = config;
    const auto t = dims.rows(), hidden = cf.hidden_size, tables = cf.num_ngram_tables();
    std::vector<std::int64_t> tok(tokens.begin(), tokens.end());
    c.tokens = device_array<std::int64_t>::upload(tok, stream);
    device_floats merged(t * hidden, stream);
    k::gather_table_rows(w("model.embed_tokens.weight"), c.tokens.get(), 1, t, hidden, merged.get(), stream);
    std::vector<std::int64_t> ids;
    if (tables) {
      const ngram_hasher hasher(cf);
      ids.resize(static_cast<std::size_t>(t * tables));
      for (std::int64_t seq = 0; seq < dims.sequences; ++seq) {  // each training sequence starts a fresh context
        ngram_context context;
        hasher.hash(tokens.subspan(static_cast<std::size_t>(seq * dims.seq_len), static_cast<std::size_t>(dims.seq_len)),
                    context, ids.data() + seq * dims.seq_len * tables);
      }
      c.ngram_ids = device_array<std::int64_t>::upload(ids, stream);
      for (std::int64_t i = 0; i < tables; ++i) {
        const std::string n = std::to_string(i);
        auto& table = param("model.ngram_embeddings.embedders." + n + ".weight");
        const auto d = table.cols;
        c.gathered.emplace_back(t * d, stream);
        k::gather_table_rows(table.value.get(), c.ngram_ids.get() + i, tables, t, d, c.gathered.back().get(), stream);
        matmul(false, true, t, hidden, d, c.gathered.back().get(), d, w("model.ngram_embeddings.post_projs." + n + ".weight"), d,
               1, merged.get(), hidden);
      }
      k::scale(merged.get(), 1.0f / static_cast<float>(1 + tables), t * hidden, stream);
    }
    device_floats out;
    switch (cf.embedding_amplification) {
      case amplification::none: out = std::move(merged); break;
      case amplification::sqrt_hidden:
        k::scale(merged.get(), static_cast<float>(std::sqrt(static_cast<double>(hidden))), t * hidden, stream);
        out = std::move(merged);
        break;
      case amplification::layer_norm:
        out = device_floats(t * hidden, stream);
        c.std_inv = device_floats(t, stream);
        k::layer_norm_forward(merged.get(), t, hidden, static_cast<float>(cf.rms_norm_eps), out.get(), c.std_inv.get(), stream);
        c.out = device_floats::copy_of(out.get(), t * hidden, stream);
        break;
    }
    return out;
  }

  void embedding_backward(const float* dy, const embedding_cache& c, const batch_dims& dims) {
    const auto& cf = config;
    const auto t = dims.rows(), hidden = cf.hidden_size, tables = cf.num_ngram_tables();
    device_floats dmerged = device_floats::copy_of(dy, t * hidden, stream);
    switch (cf.embedding_amplification) {
      case amplification::none: break;
      case amplification::sqrt_hidden:
        k::scale(dmerged.get(), static_cast<float>(std::sqrt(static_cast<double>(hidden))), t * hidden, stream);
        break;
      case amplification::layer_norm:
        TROUPE_CUDA_CHECK(cudaMemsetAsync(dmerged.get(), 0, static_cast<std::size_t>(t * hidden) * sizeof(float), stream));
        k::layer_norm_backward(dy, c.out.get(), c.std_inv.get(), t, hidden, dmerged.get(), stream);
        break;
    }
    if (tables) k::scale(dmerged.get(), 1.0f / static_cast<float>(1 + tables), t * hidden, stream);
    auto& base = param("model.embed_tokens.weight");
    k::scatter_add_table_rows(dmerged.get(), c.tokens.get(), 1, t, hidden, base.grad.get(), base.touched.get(), stream);
    for (std::int64_t i = 0; i < tables; ++i) {
      const std::string n = std::to_string(i);
      auto& table = param("model.ngram_embeddings.embedders." + n + ".weight");
      const auto d = table.cols;
      const std::string proj = "model.ngram_embeddings.post_projs." + n + ".weight";
      device_floats drows = device_floats::zeros(t * d, stream);
      linear_backward(dmerged.get(), c.gathered[static_cast<std::size_t>(i)].get(), w(proj), t, d, hidden, drows.get(), g(proj));
      k::scatter_add_table_rows(drows.get(), c.ngram_ids.get() + i, tables, t, d, table.grad.get(), table.touched.get(),
                                stream);
    }
  }

  // The ScMoE block (stage_model::block_forward); `c.h` holds its input.
  device_floats block_forward(std::int64_t l, const batch_dims& dims, block_cache& c, std::vector<std::int64_t>* load) {
    const auto t = dims.rows(), n = t * config.hidden_size;
    const std::string p = "model.layers." + std::to_string(l) + ".";
    norm_forward(p + "input_layernorm.0.weight", c.h.get(), t, c.n0);
    c.a = mla_forward(p + "self_attn.0.", c.n0.y.get(), dims, c.attention[0]);
    k::add(c.a.get(), c.h.get(), n, stream);  // a = h + MLA_0(RMS(h))
    norm_forward(p + "post_attention_layernorm.0.weight", c.a.get(), t, c.p0);
    const float* u = c.p0.y.get();
    device_floats moe = moe_forward(p + "mlp.", u, t, c.moe, load);
    c.b = mlp_forward(p + "mlps.0.", u, t, c.mlp[0], config.ffn_hidden_size);
    k::add(c.b.get(), c.a.get(), n, stream);  // b = a + MLP_0(u)
    norm_forward(p + "input_layernorm.1.weight", c.b.get(), t, c.n1);
    c.c = mla_forward(p + "self_attn.1.", c.n1.y.get(), dims, c.attention[1]);
    k::add(c.c.get(), c.b.get(), n, stream);  // c = b + MLA_1(RMS(b))
    norm_forward(p + "post_attention_layernorm.1.weight", c.c.get(), t, c.p1);
    device_floats out = mlp_forward(p + "mlps.1.", c.p1.y.get(), t, c.mlp[1], config.ffn_hidden_size);
    k::add(out.get(), c.c.get(), n, stream);
    k::add(out.get(), moe.get(), n, stream);  // (c + MLP_1(v)) + moe
    return out;
  }

  device_floats block_backward(std::int64_t l, const float* dy, const batch_dims& dims, const block_cache& c) {
    const auto t = dims.rows(), n = t * config.hidden_size, f = config.ffn_hidden_size;
    const std::string p = "model.layers." + std::to_string(l) + ".";
    // Through c + MLP_1(RMS(c)).
    device_floats dv = device_floats::zeros(n, stream), dc = device_floats::copy_of(dy, n, stream);
    mlp_backward(p + "mlps.1.", dy, c.p1.y.get(), c.mlp[1].gate.get(), c.mlp[1].up.get(), c.mlp[1].act.get(), t, f, dv.get());
    norm_backward(p + "post_attention_layernorm.1.weight", dv.get(), c.c.get(), c.p1, t, dc.get());
    // Through b + MLA_1(RMS(b)).
    device_floats dn1 = device_floats::zeros(n, stream), db = device_floats::copy_of(dc.get(), n, stream);
    mla_backward(p + "self_attn.1.", dc.get(), c.n1.y.get(), c.attention[1], dims, dn1.get());
    norm_backward(p + "input_layernorm.1.weight", dn1.get(), c.b.get(), c.n1, t, db.get());
    // Through a + MLP_0(u) and the MoE term (both read u).
    device_floats du = device_floats::zeros(n, stream), da = device_floats::copy_of(db.get(), n, stream);
    const float* u = c.p0.y.get();
    mlp_backward(p + "mlps.0.", db.get(), u, c.mlp[0].gate.get(), c.mlp[0].up.get(), c.mlp[0].act.get(), t, f, du.get());
    moe_backward(p + "mlp.", dy, u, c.moe, t, du.get());
    norm_backward(p + "post_attention_layernorm.0.weight", du.get(), c.a.get(), c.p0, t, da.get());
    // Through h + MLA_0(RMS(h)).
    device_floats dn0 = device_floats::zeros(n, stream), dh = device_floats::copy_of(da.get(), n, stream);
    mla_backward(p + "self_attn.0.", da.get(), c.n0.y.get(), c.attention[0], dims, dn0.get());
    norm_backward(p + "input_layernorm.0.weight", dn0.get(), c.h.get(), c.n0, t, dh.get());
    return dh;
  }

  // Final norm, lm_head and cross-entropy in chunks of rows; dh (+=) when not null.
  double head(const float* h, std::span<const std::int32_t> targets, std::int64_t rows, float weight, float* dh) {
    const auto hidden = config.hidden_size, vocab = config.vocab_size;
    const std::int64_t chunk = std::max<std::int64_t>(1, (std::int64_t(256) << 20) / (vocab * 4));  // <= 256 MB of logits
    auto tgt = device_array<std::int32_t>::upload(targets, stream);
    device_floats losses(rows, stream);
    device_floats normed(std::min(chunk, rows) * hidden, stream), rms_inv(std::min(chunk, rows), stream);
    device_floats logits(std::min(chunk, rows) * vocab, stream), dnormed(std::min(chunk, rows) * hidden, stream);
    const float* nw = w("model.norm.weight");
    const float* lw = w("lm_head.weight");
    for (std::int64_t r0 = 0; r0 < rows; r0 += chunk) {
      const auto n = std::min(chunk, rows - r0);
      const float* x = h + r0 * hidden;
      k::rms_norm_forward(x, nw, n, hidden, hidden, static_cast<float>(config.rms_norm_eps), 1.0f, normed.get(),
                          rms_inv.get(), stream);
      linear(normed.get(), lw, n, hidden, vocab, logits.get());
      k::cross_entropy(logits.get(), tgt.get() + r0, n, vocab, weight, losses.get() + r0, stream);
      if (!dh) continue;
      matmul(false, false, n, hidden, vocab, logits.get(), vocab, lw, hidden, 0, dnormed.get(), hidden);
      matmul(true, false, vocab, hidden, n, logits.get(), vocab, normed.get(), hidden, 1, g("lm_head.weight"), hidden);
      k::rms_norm_backward(dnormed.get(), x, nw, rms_inv.get(), n, hidden, hidden, 1.0f, dh + r0 * hidden,
                           g("model.norm.weight"), stream);
    }
    device_array<double> total = device_array<double>::zeros(1, stream);
    k::add_sum(losses.get(), rows, total.get(), stream);
    return total.download()[0];
  }

  void prepare_rope(const batch_dims& dims) {
    if (rope_rows == dims.rows() && rope_seq_len == dims.seq_len) return;
    const rope_params rp = make_rope_params(config);
    std::vector<std::int64_t> positions(static_cast<std::size_t>(dims.rows()));
    for (std::int64_t r = 0; r < dims.rows(); ++r) positions[static_cast<std::size_t>(r)] = r % dims.seq_len;
    const auto table = make_rope_table<float>(rp.inv_freq, rp.attention_factor, positions);
    rope_cos = device_floats::upload(table.cos, stream);
    rope_sin = device_floats::upload(table.sin, stream);
    TROUPE_CUDA_CHECK(cudaStreamSynchronize(stream));
    rope_rows = dims.rows();
    rope_seq_len = dims.seq_len;
  }
};

cuda_stage::cuda_stage(const model_config& config, stage_range range, gemm_math math, int device,
                       std::shared_ptr<device_group> group, int rank)
    : impl_(std::make_unique<impl>()) {
  auto& m = *impl_;
  if (config.tie_word_embeddings)
    throw input_error("training: tie_word_embeddings is not supported (the embedding and lm_head live on different stages)");
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || device >= count)
    throw std::runtime_error("cuda_stage: no CUDA device " + std::to_string(device) + " is visible");
  m.config = config;
  m.range = range;
  m.math = math;
  m.device = device;
  m.group = std::move(group);
  m.rank = rank;
  TROUPE_CUDA_CHECK(cudaSetDevice(device));
  TROUPE_CUDA_CHECK(cudaStreamCreate(&m.stream));
  TROUPE_CUBLAS_CHECK(cublasCreate(&m.blas));
  TROUPE_CUBLAS_CHECK(cublasSetStream(m.blas, m.stream));
  const std::size_t workspace = std::size_t(32) << 20;
  TROUPE_CUDA_CHECK(cudaMalloc(&m.workspace, workspace));
  TROUPE_CUBLAS_CHECK(cublasSetWorkspace(m.blas, m.workspace, workspace));
  cudaMemPool_t pool;
  TROUPE_CUDA_CHECK(cudaDeviceGetDefaultMemPool(&pool, device));
  std::uint64_t keep = UINT64_MAX;  // activations come and go every step: keep the memory pooled
  TROUPE_CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep));

  m.specs = stage_parameters(config, range);
  m.params.reserve(m.specs.size());
  for (const auto& spec : m.specs) {
    device_param p;
    p.spec = spec;
    p.rows = spec.shape[0];
    p.cols = spec.shape.size() > 1 ? spec.shape[1] : 1;
    p.value = device_floats::zeros(p.numel(), m.stream);
    p.grad = device_floats::zeros(p.numel(), m.stream);
    if (spec.role != param_role::router_bias) {
      p.m = device_floats::zeros(p.numel(), m.stream);
      p.v = device_floats::zeros(p.numel(), m.stream);
    }
    if (spec.role == param_role::table) p.touched = device_array<std::uint8_t>::zeros(p.rows, m.stream);
    m.params.push_back(std::move(p));
  }
  for (auto& p : m.params) m.by_name[p.spec.name] = &p;
  m.softmax_scale = static_cast<float>(mla_softmax_scale(config));
  reset_expert_load();
  TROUPE_CUDA_CHECK(cudaStreamSynchronize(m.stream));
}

cuda_stage::~cuda_stage() {
  auto& m = *impl_;
  m.saved.clear();
  m.params.clear();
  m.rope_cos = {};
  m.rope_sin = {};
  cudaStreamSynchronize(m.stream);
  cublasDestroy(m.blas);
  cudaFree(m.workspace);
  cudaStreamDestroy(m.stream);
}

const model_config& cuda_stage::config() const { return impl_->config; }
const stage_range& cuda_stage::range() const { return impl_->range; }
const std::vector<parameter_spec>& cuda_stage::parameters() const { return impl_->specs; }

std::int64_t cuda_stage::parameter_count() const {
  std::int64_t n = 0;
  for (const auto& p : impl_->params) n += p.numel();
  return n;
}

void cuda_stage::init(std::uint64_t seed) {
  auto& m = *impl_;
  std::vector<float> host;
  for (auto& p : m.params) {
    host.assign(static_cast<std::size_t>(p.numel()), 0.0f);
    init_parameter<float>(p.spec.name, p.spec.role, p.spec.shape, m.config.num_layers, seed, host);
    TROUPE_CUDA_CHECK(cudaMemcpyAsync(p.value.get(), host.data(), host.size() * sizeof(float), cudaMemcpyHostToDevice, m.stream));
    TROUPE_CUDA_CHECK(cudaStreamSynchronize(m.stream));  // `host` is refilled next
  }
}

void cuda_stage::set_values(const std::vector<named_array>& values) {
  auto& m = *impl_;
  std::map<std::string, const named_array*> by_name;
  for (const auto& v : values) by_name[v.name] = &v;
  for (auto& p : m.params) {
    auto it = by_name.find(p.spec.name);
    if (it == by_name.end() || it->second->shape != p.spec.shape)
      throw input_error("the checkpoint has no tensor " + p.spec.name + " of the model's shape " + shape_to_string(p.spec.shape));
    TROUPE_CUDA_CHECK(cudaMemcpyAsync(p.value.get(), it->second->values.data(), static_cast<std::size_t>(p.numel()) * sizeof(float),
                                      cudaMemcpyHostToDevice, m.stream));
  }
}

std::vector<named_array> cuda_stage::values() const {
  std::vector<named_array> out;
  for (const auto& p : impl_->params) out.push_back({p.spec.name, p.spec.shape, p.value.download()});
  return out;
}

std::vector<named_array> cuda_stage::gradients() const {
  std::vector<named_array> out;
  for (const auto& p : impl_->params)
    if (p.spec.role != param_role::router_bias) out.push_back({p.spec.name, p.spec.shape, p.grad.download()});
  return out;
}

std::vector<std::vector<std::uint8_t>> cuda_stage::touched() const {
  std::vector<std::vector<std::uint8_t>> out;
  for (const auto& p : impl_->params)
    if (p.spec.role == param_role::table) out.push_back(p.touched.download());
  return out;
}

void cuda_stage::add_gradients(const std::vector<named_array>& grads, const std::vector<std::vector<std::uint8_t>>& touched,
                               bool overwrite) {
  auto& m = *impl_;
  std::size_t gi = 0, ti = 0;
  for (auto& p : m.params) {
    if (p.spec.role == param_role::router_bias) continue;
    const auto& src = grads.at(gi++);
    if (src.name != p.spec.name || static_cast<std::int64_t>(src.values.size()) != p.numel())
      throw std::logic_error("cuda_stage::add_gradients: " + src.name + " does not match " + p.spec.name);
    auto incoming = device_floats::upload(src.values, m.stream);
    if (overwrite) {
      TROUPE_CUDA_CHECK(cudaMemcpyAsync(p.grad.get(), incoming.get(), static_cast<std::size_t>(p.numel()) * sizeof(float),
                                        cudaMemcpyDeviceToDevice, m.stream));
    } else {
      k::add(p.grad.get(), incoming.get(), p.numel(), m.stream);
    }
    if (p.spec.role == param_role::table) {
      auto mine = p.touched.download();
      const auto& theirs = touched.at(ti++);
      for (std::size_t r = 0; r < mine.size(); ++r) mine[r] = overwrite ? theirs.at(r) : (mine[r] | theirs.at(r));
      TROUPE_CUDA_CHECK(cudaMemcpyAsync(p.touched.get(), mine.data(), mine.size(), cudaMemcpyHostToDevice, m.stream));
    }
    TROUPE_CUDA_CHECK(cudaStreamSynchronize(m.stream));  // the host arrays above die per parameter
  }
}

namespace {

// The stage's forward on the device: the output stays there (forward() downloads it, forward_loss()
// hands it to the head directly).
device_floats forward_on_device(cuda_stage::impl& m, std::int64_t id, std::span<const std::int32_t> tokens,
                       std::span<const float> hidden, const batch_dims& dims, keep_activations keep) {
  const auto t = dims.rows(), h = m.config.hidden_size;
  saved_batch s;
  device_floats x;
  if (m.range.embedding) {
    if (static_cast<std::int64_t>(tokens.size()) != t) throw std::logic_error("stage forward: token count");
    for (auto tok : tokens)
      if (tok < 0 || tok >= m.config.vocab_size)
        throw input_error("token id " + std::to_string(tok) + " is outside the vocabulary of " + std::to_string(m.config.vocab_size));
    x = m.embedding_forward(tokens, dims, s.embedding);
  } else {
    if (static_cast<std::int64_t>(hidden.size()) != t * h)
      throw std::logic_error("stage forward: hidden of " + std::to_string(hidden.size()) + " values for " + std::to_string(t) + " rows");
    x = device_floats::upload(hidden, m.stream);
  }
  m.prepare_rope(dims);
  const auto blocks = m.range.end_block - m.range.first_block;
  s.blocks.resize(static_cast<std::size_t>(blocks));
  for (std::int64_t i = 0; i < blocks; ++i) {
    auto& c = s.blocks[static_cast<std::size_t>(i)];
    c.h = std::move(x);
    x = m.block_forward(m.range.first_block + i, dims, c,
                        keep == keep_activations::yes ? &m.expert_load[static_cast<std::size_t>(i)] : nullptr);
    if (keep == keep_activations::no) c = block_cache{};
  }
  if (keep == keep_activations::yes) m.saved[id] = std::move(s);
  return x;
}

device_floats backward_on_device(cuda_stage::impl& m, std::int64_t id, device_floats g, const batch_dims& dims) {
  auto it = m.saved.find(id);
  if (it == m.saved.end()) throw std::logic_error("stage backward: no activations for micro-batch " + std::to_string(id));
  m.prepare_rope(dims);
  for (std::int64_t i = static_cast<std::int64_t>(it->second.blocks.size()); i-- > 0;) {
    g = m.block_backward(m.range.first_block + i, g.get(), dims, it->second.blocks[static_cast<std::size_t>(i)]);
    it->second.blocks[static_cast<std::size_t>(i)] = block_cache{};  // its activations are done with
  }
  if (m.range.embedding) {
    m.embedding_backward(g.get(), it->second.embedding, dims);
    TROUPE_CUDA_CHECK(cudaStreamSynchronize(m.stream));
    g = device_floats{};
  }
  m.saved.erase(it);
  return g;
}

// The head's loss from hidden states on the device; with keep_activations::yes the backward of
// the whole stage follows and grad_in gets the gradient for the previous stage.
double loss_on_device(cuda_stage::impl& m, std::int64_t id, const device_floats& h, std::span<const std::int32_t> targets,
                      const batch_dims& dims, float weight, keep_activations keep, std::vector<float>& grad_in) {
  if (!m.range.head) throw std::logic_error("cuda_stage::loss on a stage without the head");
  if (static_cast<std::int64_t>(targets.size()) != dims.rows()) throw std::logic_error("stage loss: target count");
  if (keep == keep_activations::no) return m.head(h.get(), targets, dims.rows(), weight, nullptr);
  auto dh = device_floats::zeros(h.size(), m.stream);
  const double total = m.head(h.get(), targets, dims.rows(), weight, dh.get());
  const device_floats g = backward_on_device(m, id, std::move(dh), dims);
  grad_in = g.get() ? g.download() : std::vector<float>{};
  return total;
}

}  // namespace

std::vector<float> cuda_stage::forward(std::int64_t id, std::span<const std::int32_t> tokens, std::span<const float> hidden,
                                       const batch_dims& dims, keep_activations keep) {
  return forward_on_device(*impl_, id, tokens, hidden, dims, keep).download();
}

double cuda_stage::loss(std::int64_t id, std::span<const float> hidden, std::span<const std::int32_t> targets,
                        const batch_dims& dims, float weight, keep_activations keep, std::vector<float>& grad_in) {
  return loss_on_device(*impl_, id, device_floats::upload(hidden, impl_->stream), targets, dims, weight, keep, grad_in);
}

double cuda_stage::forward_loss(std::int64_t id, std::span<const std::int32_t> tokens, std::span<const float> hidden,
                                std::span<const std::int32_t> targets, const batch_dims& dims, float weight,
                                keep_activations keep, std::vector<float>& grad_in) {
  const device_floats h = forward_on_device(*impl_, id, tokens, hidden, dims, keep);
  return loss_on_device(*impl_, id, h, targets, dims, weight, keep, grad_in);
}

std::vector<float> cuda_stage::backward(std::int64_t id, std::span<const float> grad_out, const batch_dims& dims) {
  const device_floats g = backward_on_device(*impl_, id, device_floats::upload(grad_out, impl_->stream), dims);
  return g.get() ? g.download() : std::vector<float>{};
}

std::size_t cuda_stage::activations_held() const { return impl_->saved.size(); }

void cuda_stage::zero_grad() {
  auto& m = *impl_;
  for (auto& p : m.params) {
    TROUPE_CUDA_CHECK(cudaMemsetAsync(p.grad.get(), 0, static_cast<std::size_t>(p.numel()) * sizeof(float), m.stream));
    if (p.spec.role == param_role::table) TROUPE_CUDA_CHECK(cudaMemsetAsync(p.touched.get(), 0, static_cast<std::size_t>(p.rows), m.stream));
  }
}

bool cuda_stage::reduces_on_device() const { return impl_->group != nullptr; }

void cuda_stage::all_reduce() {
  auto& m = *impl_;
  if (!m.group) throw std::logic_error("cuda_stage::all_reduce: not in a device group");
  std::vector<reduce_item> items;
  for (auto& p : m.params) {
    if (p.spec.role == param_role::router_bias) continue;
    items.push_back({reduce_item::kind::f32_sum, p.grad.get(), static_cast<std::size_t>(p.numel())});
    if (p.spec.role == param_role::table) items.push_back({reduce_item::kind::u8_max, p.touched.get(), static_cast<std::size_t>(p.rows)});
  }
  std::vector<std::int64_t> load;
  for (const auto& block : m.expert_load) load.insert(load.end(), block.begin(), block.end());
  auto loads = device_array<std::int64_t>::upload(load, m.stream);
  items.push_back({reduce_item::kind::i64_sum, loads.get(), load.size()});
  train::all_reduce(*m.group, m.rank, items, m.stream);
  load = loads.download();
  std::size_t i = 0;
  for (auto& block : m.expert_load)
    for (auto& v : block) v = load[i++];
}

double cuda_stage::grad_square_sum() const {
  auto& m = *impl_;
  auto sum = device_array<double>::zeros(1, m.stream);
  for (const auto& p : m.params)
    if (p.spec.role != param_role::router_bias) k::add_square_sum(p.grad.get(), p.numel(), sum.get(), m.stream);
  return sum.download()[0];
}

void cuda_stage::step(const optimizer_config& c, std::int64_t step, double lr, double grad_scale) {
  auto& m = *impl_;
  k::adamw_step st{};
  st.beta1 = static_cast<float>(c.beta1);
  st.beta2 = static_cast<float>(c.beta2);
  st.bias1 = static_cast<float>(1.0 - std::pow(c.beta1, static_cast<double>(step)));
  st.bias2 = static_cast<float>(1.0 - std::pow(c.beta2, static_cast<double>(step)));
  st.lr = static_cast<float>(lr);
  st.eps = static_cast<float>(c.epsilon);
  st.grad_scale = static_cast<float>(grad_scale);
  for (auto& p : m.params) {
    if (p.spec.role == param_role::router_bias) continue;
    st.decay = p.spec.role == param_role::matrix ? static_cast<float>(lr * c.weight_decay) : 0.0f;
    k::adamw(p.value.get(), p.grad.get(), p.m.get(), p.v.get(), p.rows, p.cols,
             p.spec.role == param_role::table ? p.touched.get() : nullptr, st, m.stream);
  }
  TROUPE_CUDA_CHECK(cudaStreamSynchronize(m.stream));
}

void cuda_stage::update_router_biases(double rate) {
  auto& m = *impl_;
  for (std::size_t b = 0; b < m.expert_load.size(); ++b) {
    auto& bias = m.param("model.layers." + std::to_string(m.range.first_block + static_cast<std::int64_t>(b)) +
                         ".mlp.router.e_score_correction_bias");
    parameter<float> host;
    host.value = bias.value.download();
    train::update_router_bias(host, m.expert_load[b], rate);
    TROUPE_CUDA_CHECK(cudaMemcpyAsync(bias.value.get(), host.value.data(), host.value.size() * sizeof(float),
                                      cudaMemcpyHostToDevice, m.stream));
    TROUPE_CUDA_CHECK(cudaStreamSynchronize(m.stream));
  }
}

std::vector<named_array> cuda_stage::optimizer_state() const {
  std::vector<named_array> out;
  for (const auto& p : impl_->params) {
    if (p.spec.role == param_role::router_bias) continue;
    out.push_back({p.spec.name + ".exp_avg", p.spec.shape, p.m.download()});
    out.push_back({p.spec.name + ".exp_avg_sq", p.spec.shape, p.v.download()});
  }
  return out;
}

void cuda_stage::load_optimizer_state(const std::vector<named_array>& arrays) {
  auto& m = *impl_;
  std::map<std::string, const named_array*> by_name;
  for (const auto& a : arrays) by_name[a.name] = &a;
  for (auto& p : m.params) {
    if (p.spec.role == param_role::router_bias) continue;
    for (auto [suffix, dst] : {std::pair{".exp_avg", &p.m}, std::pair{".exp_avg_sq", &p.v}}) {
      auto it = by_name.find(p.spec.name + suffix);
      if (it == by_name.end()) throw input_error("optimizer state has no " + p.spec.name + suffix);
      if (static_cast<std::int64_t>(it->second->values.size()) != p.numel())
        throw input_error("optimizer state " + p.spec.name + suffix + " has " + std::to_string(it->second->values.size()) +
                          " values, the model needs " + std::to_string(p.numel()));
      TROUPE_CUDA_CHECK(cudaMemcpyAsync(dst->get(), it->second->values.data(), static_cast<std::size_t>(p.numel()) * sizeof(float),
                                        cudaMemcpyHostToDevice, m.stream));
    }
  }
  TROUPE_CUDA_CHECK(cudaStreamSynchronize(m.stream));
}

const std::vector<std::vector<std::int64_t>>& cuda_stage::expert_load() const { return impl_->expert_load; }

void cuda_stage::reset_expert_load() {
  auto& m = *impl_;
  m.expert_load.assign(static_cast<std::size_t>(m.range.end_block - m.range.first_block),
                       std::vector<std::int64_t>(static_cast<std::size_t>(m.config.num_router_experts()), 0));
}

void cuda_stage::add_expert_load(const std::vector<std::vector<std::int64_t>>& load) {
  auto& m = *impl_;
  if (load.size() != m.expert_load.size()) throw std::logic_error("add_expert_load: block count");
  for (std::size_t b = 0; b < load.size(); ++b)
    for (std::size_t e = 0; e < load[b].size(); ++e) m.expert_load[b].at(e) += load[b][e];
}

std::size_t cuda_stage::device_bytes() const {
  std::size_t free = 0, total = 0;
  TROUPE_CUDA_CHECK(cudaMemGetInfo(&free, &total));
  return total - free;
}

}  // namespace troupe::train
