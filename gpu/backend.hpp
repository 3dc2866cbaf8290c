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
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "gpu/sampling.hpp"
#include "gpu/tensor.hpp"

namespace troupe {

struct model_config;

enum class write_mode : std::uint8_t { overwrite, accumulate };

/// Rotary embedding parameters, precomputed from the config (YaRN included).
struct rope_params {
  std::vector<float> inv_freq;   // [rope_dim / 2]
  float attention_factor = 1.0f; // multiplies cos and sin (YaRN)
};

/// Where a step's rows sit in one attention layer's paged latent cache. Every tensor lives on
/// the backend's device. Row r belongs to sequence row_seq[r], sits at position positions[r],
/// and attends over that sequence's latents 0..positions[r] (causal). block_table[s, b] is the
/// address of sequence s's b-th block ([block_tokens, kv_lora + rope] float32 rows), so a
/// decode step's indexing is data on the device and one recorded step serves every step.
struct paged_latents {
  tensor block_table;  // i64 [S, max_blocks]
  tensor row_seq;      // i32 [T]
  tensor positions;    // i64 [T]
  std::int64_t block_tokens = 0;
  std::int64_t max_keys = 0;           // >= positions[r] + 1 for every row
  std::int64_t rows_per_sequence = 1;  // the most rows one sequence has here (prefill: many; decode: one)
  // The host's row_seq and positions where the caller has them (else undefined): a backend that
  // groups prefill rows by sequence on the host reads these rather than waiting for a download.
  tensor host_row_seq, host_positions;
};

/// The N-gram cache on a backend's device: per slot, the last N-1 tokens of one sequence's
/// current segment, so a decode step hashes its tokens where its tables are (spec section 2;
/// ids equal the host ngram_hasher's).
class device_ngram {
 public:
  virtual ~device_ngram() = default;
  /// Sets slot `slot`'s context to `tail` (oldest first), e.g. when another sequence takes the
  /// slot. A host transfer: not inside a recording.
  virtual void set(int slot, std::span<const std::int32_t> tail) = 0;
  /// For i < tokens.numel(): hashes tokens[i] (i32, device) as the next token of slot i and
  /// advances slot i; ids (i64 [num_tables, S], device) get each table's ids contiguously.
  virtual void hash_next(const tensor& tokens, tensor& ids) = 0;
};

/// A recorded sequence of a backend's ops that can run again (a CUDA graph): the same ops on
/// the same buffers, so each replay sees whatever those buffers hold then.
class recorded_ops {
 public:
  virtual ~recorded_ops() = default;
  virtual void replay() = 0;
};

/// Shape of an MLA attention call.
struct mla_dims {
  std::int64_t num_heads, nope_dim, rope_dim, v_dim, kv_lora_rank;
};

/// One MoE layer as routed_moe reads it: the router (routed experts first, then zero experts)
/// and the routed experts' matrices.
struct moe_layer {
  tensor router;  // f32 [E, H]
  tensor bias;    // f32 [E]
  int top_k = 0;
  float scaling = 1.0f;
  std::span<const tensor> gate_up, down;
};

/// Interleaved RoPE as the ops apply it: the pair (2i, 2i + 1) of a head's rope columns turns by
/// position * inv_freq[i] (float32 angle), with cos and sin scaled by attention_factor (YaRN).
struct rope_table {
  tensor inv_freq;  // f32 [rope / 2] on the backend's device
  float attention_factor = 1.0f;
};

/// The RMS norm of MLA's compressed latent: columns [0, kv_lora) become
/// x / rms(x) * weight * post_scale.
struct latent_norm {
  tensor weight;  // f32 [kv_lora]
  float eps = 0.0f, post_scale = 1.0f;
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
  /// (what linear() reads); norms and the router are always float32.
  virtual dtype weight_type(dtype stored) const = 0;
  /// The dtype mla_attention() reads kv_b in, for a checkpoint's `stored` dtype: float32 unless a
  /// backend reads bf16 there (a GPU: decode's attention reads kv_b every step).
  virtual dtype kv_b_type(dtype) const { return dtype::f32; }
  /// Host copy of a tensor of this device (waits for pending work).
  virtual tensor download(const tensor& t) = 0;
  /// Copies rows of `src` into `dst` starting at row `dst_row` (same row width and dtype).
  virtual void copy_rows(const tensor& src, tensor& dst, std::int64_t dst_row) = 0;
  /// Waits until every enqueued op has finished.
  virtual void synchronize() = 0;

  /// y[M,N] (=|+=) x[M,K] . w[N,K]^T; w in weight_type(), accumulation in float32.
  virtual void linear(const tensor& x, const tensor& w, tensor& y, write_mode mode) = 0;
  /// y1 = x . w1^T and y2 = x . w2^T (overwrite): two projections of one input (MLA's q_a and
  /// kv_a). The default is two linear() calls (gpu/backend.cpp); a GPU reads both matrices in
  /// one launch where decode's few rows make each launch's fixed latency count.
  virtual void linear_pair(const tensor& x, const tensor& w1, tensor& y1, const tensor& w2, tensor& y2);
  /// y[M,C] = x / rms(x) * w, row-wise, computed in float32.
  virtual void rms_norm(const tensor& x, const tensor& w, float eps, tensor& y) = 0;
  /// y += x; normed = rms_norm(y) * w: the residual add and the next sublayer's norm in one pass.
  virtual void add_rms_norm(tensor& y, const tensor& x, const tensor& w, float eps, tensor& normed) = 0;
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
  /// act[M,F] = silu(x . w[0:F]^T) * (x . w[F:2F]^T) for w[2F, K] = [gate; up] in weight_type():
  /// the SwiGLU MLP's first half. The default composes linear and swiglu (gpu/backend.cpp); a GPU
  /// fuses them where decode's few rows make the intermediate a launch of its own.
  virtual void linear_swiglu(const tensor& x, const tensor& w, tensor& act);
  /// out[R,C] = float32(table[ids[r]]); table may be bf16/f16/f32; ids are i64.
  virtual void gather_rows(const tensor& table, const tensor& ids, tensor& out) = 0;
  /// out[rows[r]] += weights[r] * x[r]  (rows i32 [R], weights f32 [R], x [R,C]).
  virtual void scatter_add_rows(const tensor& x, const tensor& rows, const tensor& weights, tensor& out) = 0;

  /// The n-gram embedding combination (spec section 2):
  /// out[T,H] = (base[tokens] + sum_i proj_i(tables_i[ngram_ids[i, :]])) / (1 + E).
  /// tokens i64 [T] and ngram_ids i64 [E, T] (table-major) on the host, or on this device where
  /// the tables are. The default composes gather_rows, linear and scale (gpu/backend.cpp).
  virtual void ngram_embed(const tensor& base, const tensor& tokens, const tensor& ngram_ids,
                           std::span<const tensor> tables, std::span<const tensor> projections, tensor& out);
  /// The same for decode's next tokens, hashed where the tables are: ngram_ids (i64 [E, T], this
  /// device) get the ids of `next` (i32 [T], this device) as the next tokens of `cache`'s slots
  /// 0..T-1, which advance; `tokens` (i64 [T]) are the same tokens as embedding rows. The default
  /// hashes (device_ngram::hash_next), then embeds; a GPU does both in one kernel.
  virtual void ngram_embed_next(device_ngram& cache, const tensor& next, const tensor& base, const tensor& tokens,
                                tensor& ngram_ids, std::span<const tensor> tables, std::span<const tensor> projections,
                                tensor& out);

  /// MLA's new latent rows, prepared and stored in one pass: in place on kv[T, kv_lora + rope],
  /// the first kv_lora columns of each row become rms_norm(them) * norm * post_scale and the
  /// rope columns are rotated at the row's position (`rope`); then each row is written to its
  /// place in the paged cache (`where`).
  virtual void write_latents(tensor& kv, const latent_norm& norm, const rope_table& rope, const paged_latents& where) = 0;
  /// Causal MLA attention over the compressed latent cache, as with kv_b absorbed (a backend may
  /// decompress the latents instead: the same function, e.g. a GPU's prefill on tensor cores):
  /// q[T, heads*(nope+rope)] -> out[T, heads*v], kv_b[heads*(nope+v), kv_lora] in kv_b_type(). q's rope columns
  /// come un-rotated: each head's are rotated at its row's position (`rope`) as q is absorbed.
  virtual void mla_attention(const tensor& q, const tensor& kv_b, const paged_latents& cache, const mla_dims& dims,
                             const rope_table& rope, float softmax_scale, tensor& out) = 0;

  /// Router: p = softmax(logits[T,E]); idx = topk(p + bias, k); w = p[idx] * scaling.
  /// idx i32 [T,k], w f32 [T,k], ordered by descending biased score.
  virtual void router_topk(const tensor& logits, const tensor& bias, int k, float scaling, tensor& idx,
                           tensor& weights) = 0;

  /// Up to how many rows the model should call routed_moe() instead of routing on the host
  /// (0: never). Decode on a GPU: no host round trip for the routing, no launch per expert.
  virtual std::int64_t routed_moe_rows() const = 0;
  /// The MoE of rows u[T,H], routed on this device: logits = u . router^T, idx and gates as
  /// router_topk(logits, bias, top_k, scaling) gives them, then
  /// out[t] (=|+=) sum_j gates[t,j] * (idx[t,j] < n_routed ? SwiGLU_idx(u[t]) : u[t]), j in order,
  /// with n_routed = gate_up.size(); expert e's gate_up [2F,H] and down [H,F] in weight_type().
  virtual void routed_moe(const tensor& u, const moe_layer& moe, tensor& out, write_mode mode) = 0;

  /// tokens[d] (i32 [D] on this device) = the token draws[d] picks from row draws[d].row of
  /// logits[R, V]: sample_token()'s rule (penalty, top-k, temperature, top-p, then the draw's
  /// uniform; argmax when greedy). The default downloads the logits and picks on the host
  /// (gpu/backend.cpp); a GPU picks where the logits are, so only the tokens cross the bus.
  virtual void sample(const tensor& logits, std::span<const token_draw> draws, tensor& tokens);

  /// ids[r] (i32 or i64 [R] on this device) = the argmax of row r of logits[R, V], lowest id on
  /// ties: greedy decoding's pick with no host transfer, so a recording can hold it (k greedy
  /// draft steps chained in one replay). The default picks on the host (gpu/backend.cpp).
  virtual void argmax(const tensor& logits, tensor& ids);

  /// An N-gram cache of `slots` slots on this device for `config`'s tables; nullptr where the
  /// backend has none (the CPU hashes on the host).
  virtual std::unique_ptr<device_ngram> make_device_ngram(const model_config&, int) { return nullptr; }

  /// A backend on the same device with a stream of its own, for an actor that records its steps
  /// while others enqueue on this one (a capture takes in every op on its stream); nullptr where
  /// ops run as they are called (the CPU: nothing to keep apart).
  virtual std::unique_ptr<backend> own_stream() const { return nullptr; }

  /// Enqueues `side`'s ops, then `main`'s, as two branches that may run at the same time: neither
  /// reads what the other writes, and ops called after this see both done. LongCat's shortcut MoE
  /// reads only the block's first half, so it runs beside the second half. The default runs them
  /// in turn; a GPU that records puts `side` on a second stream of the recording, so its kernels
  /// fill the SMs that the other branch's latency-bound kernels leave idle.
  virtual void concurrently(const std::function<void()>& side, const std::function<void()>& main);

  /// Whether record() works here (a GPU: replaying a recording saves the host's dispatch of
  /// every op; the CPU runs its ops as they are called anyway).
  virtual bool records() const { return false; }
  /// A recording and the tensor its body returned, where each replay leaves its result.
  struct recording {
    std::unique_ptr<recorded_ops> ops;
    tensor out;
  };
  /// Runs `body` once (a warm-up; its result is dropped), then records the ops it enqueues.
  /// `body` must use only this backend's ops on device buffers that stay put (its inputs are
  /// buffers the caller refills before each replay; an upload or a download in it throws), and
  /// running it again must be harmless. The tensors it allocates while recording stay reserved
  /// for the recording. Nothing else may use the backend meanwhile.
  virtual recording record(const std::function<tensor()>& body);

 protected:
  /// Throws std::invalid_argument unless tokens are i64 [T] and ngram_ids i64 [E, T] (ngram_embed's contract).
  static void check_ngram_embed_args(const tensor& tokens, const tensor& ngram_ids, std::size_t num_tables);
};

}  // namespace troupe
