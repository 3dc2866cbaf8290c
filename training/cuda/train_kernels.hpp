// The training kernels of the CUDA stage (train_kernels.cu): the forward and backward of the
// model's element-wise and row-wise pieces, on float32 device arrays, as launch functions on a
// stream. The same formulas as training/dense.cpp (the CPU trainer), which the GPU tests compare
// against. Every function checks its launch. Row-major throughout.
//
// Gradient rule as on the CPU: a *_backward adds (+=) into the input gradient and into parameter
// gradients (dw of a norm, table rows) and never overwrites them.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace troupe::train::cuda {

/// y[r, :cols] = x[r, :cols] / rms * w * post_scale, rms_inv[r] = 1 / rms (x and y rows `stride` apart).
void rms_norm_forward(const float* x, const float* w, std::int64_t rows, std::int64_t cols, std::int64_t stride, float eps,
                      float post_scale, float* y, float* rms_inv, cudaStream_t s);
/// dx += ..., dw += ... (the rows of dy and dx are `stride` apart, like x's).
void rms_norm_backward(const float* dy, const float* x, const float* w, const float* rms_inv, std::int64_t rows,
                       std::int64_t cols, std::int64_t stride, float post_scale, float* dx, float* dw, cudaStream_t s);
/// Parameter-free layer norm of [rows, cols]: y and std_inv; the backward adds into dx.
void layer_norm_forward(const float* x, std::int64_t rows, std::int64_t cols, float eps, float* y, float* std_inv,
                        cudaStream_t s);
void layer_norm_backward(const float* dy, const float* y, const float* std_inv, std::int64_t rows, std::int64_t cols,
                         float* dx, cudaStream_t s);

/// Interleaved RoPE in place on columns [offset, offset + 2 * half) of each head block of
/// x[rows, heads * stride], with cos/sin [rows, half]; inverse rotates back (the backward).
void rope(float* x, const float* cos, const float* sin, std::int64_t rows, std::int64_t heads, std::int64_t stride,
          std::int64_t offset, std::int64_t half, bool inverse, cudaStream_t s);

/// out = silu(gate) * up over n values; the backward overwrites dgate and dup.
void swiglu_forward(const float* gate, const float* up, float* out, std::int64_t n, cudaStream_t s);
void swiglu_backward(const float* dout, const float* gate, const float* up, float* dgate, float* dup, std::int64_t n,
                     cudaStream_t s);

/// y += x; y *= a (n values).
void add(float* y, const float* x, std::int64_t n, cudaStream_t s);
void scale(float* y, float a, std::int64_t n, cudaStream_t s);
/// dst[r, :cols] = src[r, :cols] with row strides (a column block of a wider matrix).
void copy_columns(const float* src, std::int64_t src_stride, float* dst, std::int64_t dst_stride, std::int64_t rows,
                  std::int64_t cols, cudaStream_t s);

/// MLA's keys per head: key[r, h] = [kvb[r, h, :nope] | k_lat[r, kvr:]] ([rows, heads, nope + rope]).
void assemble_keys(const float* kvb, const float* k_lat, std::int64_t rows, std::int64_t heads, std::int64_t nope,
                   std::int64_t rope, std::int64_t v_dim, std::int64_t kv_lora, float* key, cudaStream_t s);
/// The key gradient back to its sources: dkvb[r, h, :nope] += dkey[r, h, :nope] and
/// dk_lat[r, kvr:] = sum_h dkey[r, h, nope:] (the rope key is shared by every head).
void split_key_grad(const float* dkey, std::int64_t rows, std::int64_t heads, std::int64_t nope, std::int64_t rope,
                    std::int64_t v_dim, std::int64_t kv_lora, float* dkvb, float* dk_lat, cudaStream_t s);

/// Causal softmax of one sequence's scores [heads, n, n] in place (row i keeps keys 0..i, the
/// rest become 0), scaled by `scale` first; lse[h * n + i] = the row's log-sum-exp.
void causal_softmax(float* scores, std::int64_t heads, std::int64_t n, float scale, float* lse, cudaStream_t s);
/// The probabilities again from the scores and lse (attention's backward recomputes them).
void causal_softmax_recompute(float* scores, const float* lse, std::int64_t heads, std::int64_t n, float scale,
                              cudaStream_t s);
/// dP [heads, n, n] -> dS = P * (dP - delta) * scale in place, zero above the diagonal, with
/// delta[(row0 + i) * heads + h] = the row's sum(dO * O).
void softmax_grad(const float* probs, float* dp, const float* delta, std::int64_t row0, std::int64_t heads, std::int64_t n,
                  float scale, cudaStream_t s);
/// delta[r * heads + h] = sum_d a[r, h, d] * b[r, h, d].
void head_dots(const float* a, const float* b, std::int64_t rows, std::int64_t heads, std::int64_t dim, float* delta,
               cudaStream_t s);

/// The router: probs = softmax(logits [rows, experts]) in place; idx [rows, k] the top k of
/// probs + bias (higher first, lower id on ties: the inference rule); gates = probs[idx] * scaling.
void router_forward(float* probs, const float* bias, std::int64_t rows, std::int64_t experts, int k, float scaling,
                    std::int32_t* idx, float* gates, cudaStream_t s);
/// dlogits[r] = p[r] * (dp[r] - sum(p[r] * dp[r])) (overwrite).
void softmax_backward(const float* probs, const float* dprobs, std::int64_t rows, std::int64_t cols, float* dlogits,
                      cudaStream_t s);
/// out[i] = src[rows[i]] for i < n (rows i32, width h).
void gather(const float* src, const std::int32_t* rows, std::int64_t n, std::int64_t h, float* out, cudaStream_t s);
/// out[rows[i]] += gates[rows[i] * k + slots[i]] * y[i]: an expert's outputs into the MoE sum.
void combine_expert(const float* y, const std::int32_t* rows, const std::int32_t* slots, const float* gates, int k,
                    std::int64_t n, std::int64_t h, float* out, cudaStream_t s);
/// out[r] = sum over r's slots j with idx >= n_routed of gates[r, j] * u[r]: the zero experts
/// (overwrites out; the routed experts add after).
void combine_zero_experts(const float* u, const std::int32_t* idx, const float* gates, std::int64_t rows, int k,
                          std::int32_t n_routed, std::int64_t h, float* out, cudaStream_t s);
/// An expert's backward inputs: for its i-th row r (slot j): dprobs[r, e] = dot(dy[r], y[i]) *
/// scaling, dexpert[i] = gates[r, j] * dy[r].
void expert_grad(const float* dy, const float* y, const std::int32_t* rows, const std::int32_t* slots, const float* gates,
                 int k, std::int64_t n, std::int64_t h, std::int32_t expert, std::int64_t experts, float scaling,
                 float* dprobs, float* dexpert, cudaStream_t s);
/// The zero experts' backward: for each slot j of row r with idx >= n_routed, dprobs[r, idx] =
/// dot(dy[r], u[r]) * scaling and du[r] += gates[r, j] * dy[r].
void zero_experts_grad(const float* dy, const float* u, const std::int32_t* idx, const float* gates, std::int64_t rows,
                       int k, std::int32_t n_routed, std::int64_t experts, std::int64_t h, float scaling, float* dprobs,
                       float* du, cudaStream_t s);

/// out[r] = table[ids[r * id_stride]] for r < rows (ids i64, width d).
void gather_table_rows(const float* table, const std::int64_t* ids, std::int64_t id_stride, std::int64_t rows,
                       std::int64_t d, float* out, cudaStream_t s);
/// grad[ids[r * id_stride]] += src[r] (atomically: ids repeat) and touched[that row] = 1
/// (touched may be null).
void scatter_add_table_rows(const float* src, const std::int64_t* ids, std::int64_t id_stride, std::int64_t rows,
                            std::int64_t d, float* grad, std::uint8_t* touched, cudaStream_t s);
/// grad[rows[i]] += src[i] (rows i32, unique within a call).
void scatter_add(const float* src, const std::int32_t* rows, std::int64_t n, std::int64_t h, float* grad, cudaStream_t s);

/// Cross-entropy of logits [rows, vocab], in place: for each row with target >= 0,
/// loss[r] = (logsumexp - logit[target]) * weight and the row becomes (softmax - onehot) *
/// weight; rows with target < 0 get loss 0 and a zero gradient.
void cross_entropy(float* logits, const std::int32_t* targets, std::int64_t rows, std::int64_t vocab, float weight,
                   float* loss, cudaStream_t s);

/// sum += sum of x[i]^2 (double accumulation).
void add_square_sum(const float* x, std::int64_t n, double* sum, cudaStream_t s);
/// sum += sum of x[i] (double accumulation).
void add_sum(const float* x, std::int64_t n, double* sum, cudaStream_t s);

/// One AdamW update of a [rows, cols] parameter (value, grad, moments m and v), gradients
/// multiplied by grad_scale first; rows with touched[r] == 0 are left alone when touched is not
/// null (lazy updates of table rows).
struct adamw_step {
  float beta1, beta2, bias1, bias2, lr, eps, decay, grad_scale;
};
void adamw(float* value, const float* grad, float* m, float* v, std::int64_t rows, std::int64_t cols,
           const std::uint8_t* touched, const adamw_step& step, cudaStream_t s);

}  // namespace troupe::train::cuda
