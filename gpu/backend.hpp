// The compute interface every model layer is written against. One implementation per device
// kind (cpu/ now, cuda/ later); the model code never branches on the device.
//
// Contract: ops are enqueued in call order on the backend's stream and may complete
// asynchronously; results are visible to later ops of the same backend without waiting, and
// to the host after synchronize() (download() synchronizes). Tensors passed in must live on
// this backend's device. Activations are float32; weights may be bf16/f16/f32 where an op says
// so (tables are read in place, e.g. from a memory-mapped checkpoint).
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "gpu/tensor.hpp"

namespace troupe {

enum class write_mode : std::uint8_t { overwrite, accumulate };

/// Rotary embedding parameters, precomputed from the config (YaRN included).
struct rope_params {
  std::vector<float> inv_freq;   // [rope_dim / 2]
  float attention_factor = 1.0f; // multiplies cos and sin (YaRN)
};

/// One sequence's rows in an attention call and the paged latent cache they attend over.
struct attention_segment {
  std::int64_t row_begin = 0;       // first row of this sequence in q / out
  std::int64_t num_rows = 0;        // new tokens of this sequence in the step
  std::int64_t first_position = 0;  // position of row_begin = tokens cached before the step
  std::vector<tensor> blocks;       // each [block_tokens, kv_lora + rope]: keys 0.. in order, already
                                    // holding the new rows; all blocks have the same number of rows
};

/// Shape of an MLA attention call.
struct mla_dims {
  std::int64_t num_heads, nope_dim, rope_dim, v_dim, kv_lora_rank;
};

class backend {
 public:
  virtual ~backend() = default;

  virtual device where() const = 0;
  virtual std::string name() const = 0;

  /// Uninitialised float32/int tensor on this device.
  virtual tensor empty(shape_t shape, dtype type) = 0;
  /// Copies a host tensor to this device, converting floats to `type` (weights at load time).
  virtual tensor upload(const tensor& host, dtype type) = 0;
  /// The dtype this backend keeps a matrix in when the checkpoint stores it as `stored`
  /// (what linear() reads); other weights (norms, router, kv_b) are always float32.
  virtual dtype weight_type(dtype stored) const = 0;
  /// Host copy of a tensor of this device (waits for pending work).
  virtual tensor download(const tensor& t) = 0;
  /// Copies rows of `src` into `dst` starting at row `dst_row` (same row width and dtype).
  virtual void copy_rows(const tensor& src, tensor& dst, std::int64_t dst_row) = 0;
  /// Waits until every enqueued op has finished.
  virtual void synchronize() = 0;

  /// y[M,N] (=|+=) x[M,K] . w[N,K]^T; w in weight_type(), accumulation in float32.
  virtual void linear(const tensor& x, const tensor& w, tensor& y, write_mode mode) = 0;
  /// y[M,C] = x / rms(x) * w, row-wise, computed in float32.
  virtual void rms_norm(const tensor& x, const tensor& w, float eps, tensor& y) = 0;
  /// In place on x[M, W]: the first `cols` columns of each row become
  /// rms_norm(those columns) * w * post_scale; the rest are untouched (MLA's compressed latent).
  virtual void rms_norm_prefix_inplace(tensor& x, std::int64_t cols, const tensor& w, float eps, float post_scale) = 0;
  /// y = (x - mean(x)) / std(x) row-wise, no affine weights (embedding amplification).
  virtual void layer_norm(const tensor& x, float eps, tensor& y) = 0;
  /// y = 0
  virtual void zero(tensor& y) = 0;
  /// y *= s
  virtual void scale(tensor& y, float s) = 0;
  /// y += x
  virtual void add(tensor& y, const tensor& x) = 0;
  /// out[M,F] = silu(gate_up[:, :F]) * gate_up[:, F:]
  virtual void swiglu(const tensor& gate_up, tensor& out) = 0;
  /// out[R,C] = float32(table[ids[r]]); table may be bf16/f16/f32; ids are i64.
  virtual void gather_rows(const tensor& table, const tensor& ids, tensor& out) = 0;
  /// out[rows[r]] += weights[r] * x[r]  (rows i32 [R], weights f32 [R], x [R,C]).
  virtual void scatter_add_rows(const tensor& x, const tensor& rows, const tensor& weights, tensor& out) = 0;

  /// The n-gram embedding combination (spec section 2):
  /// out[T,H] = (base[tokens] + sum_i proj_i(tables_i[ngram_ids[:, i]])) / (1 + E).
  /// Token and n-gram ids are on the host. The default composes gather_rows, linear and
  /// scale (gpu/backend.cpp); a backend with a fused kernel overrides it.
  virtual void ngram_embed(const tensor& base, const tensor& tokens, const tensor& ngram_ids,
                           std::span<const tensor> tables, std::span<const tensor> projections, tensor& out);

  /// Rotates, in place, the interleaved pairs of columns [offset, offset + rope_dim) of every
  /// head block (width `head_stride`) of x[T, heads * head_stride]; positions are i64 [T].
  virtual void rope_interleaved(tensor& x, std::int64_t num_heads, std::int64_t head_stride,
                                std::int64_t offset, const tensor& positions, const rope_params& rope) = 0;

  /// Causal MLA attention over the compressed latent cache with kv_b absorbed:
  /// q[T, heads*(nope+rope)] (roped), kv_b[heads*(nope+v), kv_lora] -> out[T, heads*v].
  virtual void mla_attention(const tensor& q, const tensor& kv_b, std::span<const attention_segment> segments,
                             const mla_dims& dims, float softmax_scale, tensor& out) = 0;

  /// Router: p = softmax(logits[T,E]); idx = topk(p + bias, k); w = p[idx] * scaling.
  /// idx i32 [T,k], w f32 [T,k], ordered by descending biased score.
  virtual void router_topk(const tensor& logits, const tensor& bias, int k, float scaling, tensor& idx,
                           tensor& weights) = 0;

  /// Up to how many rows the model should call routed_moe() instead of routing on the host
  /// (0: never). Decode on a GPU: no host round trip for the routing, no launch per expert.
  virtual std::int64_t routed_moe_rows() const = 0;
  /// The MoE of rows u[T,H] from router_topk's idx and gates [T,k] (on this device):
  /// out[t] = sum_j gates[t,j] * (idx[t,j] < n_routed ? SwiGLU_idx(u[t]) : u[t]), j in order,
  /// with n_routed = gate_up.size(); expert e's gate_up [2F,H] and down [H,F] in weight_type().
  virtual void routed_moe(const tensor& u, const tensor& idx, const tensor& gates, std::span<const tensor> gate_up,
                          std::span<const tensor> down, tensor& out) = 0;
};

}  // namespace troupe
