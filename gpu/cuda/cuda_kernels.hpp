// The CUDA backend's kernels, as launch functions on a stream (cuda_kernels.cu). Every
// function checks its launch. Each kernel may start while the one before it on the stream
// finishes (programmatic dependent launch) and waits for its results before reading them. Float32 in and out unless a name says otherwise; shapes are
// row-major.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "gpu/cuda/ngram_cache.hpp"
#include "gpu/dtype.hpp"

namespace troupe::cuda {

/// dst[i] = bf16(src[i]), round to nearest even.
void f32_to_bf16(const float* src, std::uint16_t* dst, std::int64_t n, cudaStream_t s);
/// dst[i] = float(src[i]) for a bf16/f16/f32 source.
void to_f32(dtype from, const void* src, float* dst, std::int64_t n, cudaStream_t s);

/// Most rows gemv takes (batch-1 decode and small verification steps); more go to cuBLAS's
/// tensor cores. Measured on lite-1b (H100, bench/RESULTS.md): at 8 rows the CUDA-core GEMVs
/// (and the grouped expert GEMVs) gave 1871 tok/s where tensor cores give 2847-2976; at 2 rows
/// the GEMVs win (1186-1214 against 949); at 4 they are level.
constexpr std::int64_t gemv_max_rows = 4;
/// y[M,N] (=|+=) x[M,K] . w[N,K]^T with float32 x and bf16 or f32 w, M <= gemv_max_rows: one warp
/// per output column streams its weight row once for all M rows (decode is bandwidth-bound;
/// this reads the weights once, in one launch, and keeps x in float32). Its first weight loads
/// go out before the previous kernel on the stream has finished: w must not be that kernel's
/// output.
void gemv(const float* x, std::int64_t m, std::int64_t k, dtype wt, const void* w, std::int64_t n, float* y, bool accumulate,
          cudaStream_t s);

/// y1[M,N1] = x . w1^T and y2[M,N2] = x . w2^T for bf16 w1, w2 [*, K], M <= gemv_max_rows, in one
/// launch (gemv's rules on the weights hold).
void gemv_pair_bf16(const float* x, std::int64_t m, std::int64_t k, const std::uint16_t* w1, std::int64_t n1, float* y1,
                    const std::uint16_t* w2, std::int64_t n2, float* y2, cudaStream_t s);

/// act[M,F] = SwiGLU(x . w[0:F]^T, x . w[F:2F]^T) for bf16 w [2F, K], M <= gemv_max_rows: the
/// SwiGLU MLP's gate/up projection and activation in one pass (gemv's rules on w hold).
void gemv_swiglu_bf16(const float* x, std::int64_t m, std::int64_t k, const std::uint16_t* w, std::int64_t f, float* act,
                      cudaStream_t s);

/// The n-gram embedding of a few rows (spec section 2) in one launch:
/// out[r] = (base[tokens[r]] + sum_t projections[t] . tables[t][ids[t, r]]) * scale, with bf16
/// projections [h, d], tables [*, d] and base [*, h] in bf16 or f32, ids i64 [num_tables, m]
/// (table-major) and tokens i64 [m], all on the device.
/// Decode on the device N-gram cache (`hash.tails` set): the ids are not read but hashed in the
/// same launch, row r's next token tokens32[r] against slot r's context; they are written to
/// `ids` and every slot advances past its token.
constexpr int max_ngram_tables = 8;
struct ngram_embed_args {
  const void* tables[max_ngram_tables];
  const void* projections[max_ngram_tables];
  int num_tables;
  std::int64_t d, h;
  dtype table_type, base_type;
  const void* base;
  const std::int64_t* tokens;
  std::int64_t* ids;
  float scale;
  ngram_cache_view hash;
  const std::int32_t* tokens32;
};
/// Whether ngram_embed() takes m rows of num_tables tables of width d (m <= gemv_max_rows, the
/// gathered rows and the ids fit in 48 KB of shared memory).
bool ngram_embed_fits(std::int64_t m, int num_tables, std::int64_t d);
void ngram_embed(const ngram_embed_args& args, std::int64_t m, float* out, cudaStream_t s);

/// Most rows the model gives the MoE on the device (decode batches, verification): such a step
/// needs no host round trip, so it can be recorded as a CUDA graph. Up to gemv_max_rows the
/// experts run as grouped GEMVs; beyond, as two batched tensor-core GEMMs over every routed
/// expert's slots padded to the row count (moe_dispatch below). Larger steps (prefill) route on
/// the host, where each expert's GEMM covers exactly its rows.
constexpr std::int64_t routed_moe_max_rows = 64;
/// The routing of routed_moe in one launch: router_topk's idx and gates [rows, k]
/// from the router's logits [rows, experts], then the slots grouped by expert:
/// order[offsets[e] .. offsets[e + 1]) are the slots s with idx[s] == e < n_routed (offsets
/// [n_routed + 1], order [rows * k]); active [n_routed] lists the experts that have slots, in
/// order, then -1s.
void moe_route(const float* logits, std::int64_t rows, const float* bias, std::int64_t experts, int k, float scaling,
               std::int32_t n_routed, std::int32_t* idx, float* gates, std::int32_t* offsets, std::int32_t* order,
               std::int32_t* active, cudaStream_t s);
/// The expert GEMVs of routed_moe: y[s, :n] = W_e[n, k] . x[s / x_row_div, :k] for each slot s
/// grouped under expert e (moe_route), or with `swiglu` SwiGLU of W_e's gate rows [0, n) and up
/// rows [n, 2n); each weight row is read from memory once per call. Blocks go to
/// active[0 .. max_active) (max_active >= the experts with slots); no expert has more than
/// max_group slots (<= gemv_max_rows); `weights` holds n_routed device pointers to bf16 matrices.
void grouped_expert_gemv_bf16(const float* x, std::int64_t x_row_div, std::int64_t max_group, const std::int32_t* offsets,
                              const std::int32_t* order, const std::int32_t* active, std::int32_t max_active,
                              const std::uint16_t* const* weights, std::int64_t n, std::int64_t k, bool swiglu, float* y,
                              cudaStream_t s);
/// The tensor-core MoE's data movement: x [n_routed, cap, h] (bf16) gets expert e's slots' rows of
/// u in rows [0, count_e) of its slice (zeros after);
void moe_dispatch(const float* u, std::int64_t h, int k, const std::int32_t* offsets, const std::int32_t* order,
                  std::int32_t n_routed, std::int64_t cap, std::uint16_t* x, cudaStream_t s);
/// (between the two GEMMs, swiglu_to_bf16;) y [slots, h] gets each slot's row back from out_rows [n_routed, cap, h];
void moe_undispatch(const float* out_rows, std::int64_t h, const std::int32_t* offsets, const std::int32_t* order,
                    std::int32_t n_routed, std::int64_t cap, float* y, cudaStream_t s);
/// ptrs [4 * n_routed] = expert e's slices of x, gate_up, act and out (strides in elements), for
/// cublasGemmBatchedEx, written on the device so a recording holds them.
void moe_gemm_pointers(std::int32_t n_routed, const void* x, std::int64_t x_stride, void* gate_up, std::int64_t gate_up_stride,
                       const void* act, std::int64_t act_stride, void* out, std::int64_t out_stride, const void** ptrs,
                       cudaStream_t s);
/// out[t, c] (=|+=) sum_j gates[t, j] * (idx[t, j] < n_routed ? y[t * k + j, c] : u[t, c]).
void moe_combine(const float* u, const float* y, const std::int32_t* idx, const float* gates, std::int64_t rows, int k,
                 std::int32_t n_routed, std::int64_t h, bool accumulate, float* out, cudaStream_t s);

/// y[r, :cols] = x[r, :cols] / rms(x[r, :cols]) * w * post_scale; rows `x_stride` / `y_stride` apart.
void rms_norm(const float* x, std::int64_t x_stride, const float* w, float* y, std::int64_t y_stride, std::int64_t rows,
              std::int64_t cols, float eps, float post_scale, cudaStream_t s);
/// y[r] += x[r]; normed[r] = y[r] / rms(y[r]) * w (rows of `cols` floats).
void add_rms_norm(float* y, const float* x, const float* w, float* normed, std::int64_t rows, std::int64_t cols, float eps,
                  cudaStream_t s);
/// y = (x - mean) / std, row-wise, no affine weights.
void layer_norm(const float* x, float* y, std::int64_t rows, std::int64_t cols, float eps, cudaStream_t s);
void scale(float* y, std::int64_t n, float factor, cudaStream_t s);
/// y += x
void add(float* y, const float* x, std::int64_t n, cudaStream_t s);
/// out[r, c] = silu(gate_up[r, c]) * gate_up[r, F + c]
void swiglu(const float* gate_up, float* out, std::int64_t rows, std::int64_t f, cudaStream_t s);
/// The same with bf16 out, the input of a tensor-core GEMM.
void swiglu_to_bf16(const float* gate_up, std::uint16_t* out, std::int64_t rows, std::int64_t f, cudaStream_t s);
/// out[r] = float(table[ids[r]]) for a bf16/f16/f32 table on the device.
void gather_rows(dtype type, const void* table, std::int64_t cols, const std::int64_t* ids, float* out, std::int64_t n,
                 cudaStream_t s);
/// out[rows[r]] += weights[r] * x[r]; rows distinct within a call.
void scatter_add_rows(const float* x, const std::int32_t* rows, const float* weights, float* out, std::int64_t n,
                      std::int64_t cols, cudaStream_t s);
/// A paged latent cache as the kernels read it (backend::paged_latents): row r of a step belongs
/// to sequence row_seq[r] at position positions[r]; block b of sequence s starts at address
/// block_table[s * max_blocks + b] and holds block_tokens rows of `width` floats.
struct paged_args {
  const std::int64_t* block_table;
  std::int64_t max_blocks;
  const std::int32_t* row_seq;
  const std::int64_t* positions;
  std::int64_t block_tokens, width;
};
/// MLA's compressed latent norm and the RoPE of its last columns (backend::write_latents).
struct latent_args {
  const float* norm;  // [kv_lora]
  std::int64_t kv_lora;
  float eps, post_scale;
  const float* inv_freq;  // [rope / 2]
  float attention_factor;
};
/// Most rope columns write_latents takes.
constexpr std::int64_t max_rope_dim = 128;
/// In place on kv[r] (rows of cache.width floats): the norm of columns [0, kv_lora), the rotation of
/// the rest at row r's position; then the row is stored at its place in the cache.
void write_latents(float* kv, std::int64_t rows, const latent_args& l, const paged_args& cache, cudaStream_t s);

/// Causal MLA attention with kv_b absorbed for decode and verification (backend::mla_attention with
/// fewer than mla_prefill_min_rows rows per sequence): row r of q (rope columns not yet rotated)
/// attends over its sequence's latents 0..positions[r], a block per (row, head). Latent rows of
/// at most 576 values (kv_lora + rope).
struct mla_args {
  const float* q;  // [rows, heads * (nope + rope)]
  const void* kv_b;
  dtype kv_b_type;  // bf16 or f32
  const float* inv_freq;  // RoPE of q's rope columns
  float attention_factor;
  paged_args cache;
  std::int64_t rows, heads, nope, rope, v, kv_lora;
  float softmax_scale;
  float* out;  // [rows, heads * v]
};
void mla_attention(const mla_args& a, cudaStream_t s);

/// From this many rows per sequence, mla_attention is prefill: un-absorbed on tensor cores
/// (cuda_backend::mla_prefill: one GEMM decompresses the keys and values, then mla_flash_prefill)
/// instead of a block per (row, head) re-reading kv_b.
constexpr std::int64_t mla_prefill_min_rows = 16;
/// Prefill attention, MLA un-absorbed, per sequence: its keys and values decompressed from its
/// cached latents by one GEMM against kv_b, then causal attention on tensor cores
/// (mla_flash_prefill). The bf16 operands are padded with zeros to whole tiles: head widths to 16
/// query/key and 8 value columns, rows and keys to mla_prefill_tile.
constexpr std::int64_t mla_prefill_tile = 64;
struct mla_prefill_shape {
  std::int64_t heads, nope, rope, v, rows, keys;
  std::int64_t qk_pad, v_pad, rows_pad, keys_pad;
};
inline mla_prefill_shape prefill_shape(std::int64_t heads, std::int64_t nope, std::int64_t rope, std::int64_t v,
                                       std::int64_t rows, std::int64_t keys) {
  const auto up = [](std::int64_t x, std::int64_t m) { return (x + m - 1) / m * m; };
  return {heads, nope, rope, v, rows, keys, up(nope + rope, 16), up(v, 8), up(rows, mla_prefill_tile), up(keys, mla_prefill_tile)};
}
/// lat [keys, kv_lora] = the compressed part of sequence seq's cached latent rows 0..keys-1;
void mla_prefill_gather(const paged_args& c, std::int32_t seq, std::int64_t keys, std::int64_t kv_lora, float* lat,
                        cudaStream_t s);
/// from kvd = lat . kv_b^T [keys, heads, nope + v]: bf16 keys k [heads, keys_pad, qk_pad] (the rope
/// part the cached, rotated latent columns) and values transposed, vt [heads, v_pad, keys_pad];
void mla_prefill_keys(const paged_args& c, std::int32_t seq, const float* kvd, const mla_prefill_shape& p,
                      std::int64_t kv_lora, std::uint16_t* k, std::uint16_t* vt, cudaStream_t s);
/// bf16 queries q_out [heads, rows_pad, qk_pad] of q's rows row_ids[0..rows) with their rope part rotated;
void mla_prefill_queries(const float* q, const std::int64_t* positions, const std::int32_t* row_ids,
                         const mla_prefill_shape& p, const float* inv_freq, float factor, std::uint16_t* q_out,
                         cudaStream_t s);
/// out[row_ids[i], h * v .. (h + 1) * v) = causal softmax(q_i . k^T * scale) . v of head h, query
/// row i seeing keys 0..positions[row_ids[i]] (mla_flash.cu). Heads of at most 192 query/key and
/// 128 value columns.
void mla_flash_prefill(const mla_prefill_shape& p, const std::uint16_t* q, const std::uint16_t* k, const std::uint16_t* vt,
                       const std::int64_t* positions, const std::int32_t* row_ids, float softmax_scale, float* out,
                       cudaStream_t s);

/// Router: p = softmax(logits[r]); idx = top-k of p + bias (ties: lower id first);
/// weights = p[idx] * scaling.
void router_topk(const float* logits, const float* bias, std::int64_t rows, std::int64_t experts, int k, float scaling,
                 std::int32_t* idx, float* weights, cudaStream_t s);

/// ids32[r] and/or ids64[r] (either may be null) = the argmax of logits[r, 0..vocab), lowest id
/// on ties (sample_kernel.cu).
void argmax_rows(const float* logits, std::int64_t rows, std::int64_t vocab, std::int32_t* ids32, std::int64_t* ids64,
                 cudaStream_t s);

/// One draw of backend::sample, as the kernel reads it: row `row` of the logits, the rule, the
/// uniform, and its context ids [context_begin, context_end) for the penalty.
struct sample_draw {
  std::int64_t row;
  double u;
  float temperature, top_p, penalty;
  std::int32_t top_k, context_begin, context_end;
};
/// tokens[d] = the token draws[d] picks from its row of logits[*, vocab] (sample_token's rule;
/// sample_kernel.cu says how); `penalised`: some draw has a repetition penalty other than 1.
void sample(const float* logits, std::int64_t vocab, const sample_draw* draws, std::int64_t n, const std::int32_t* context,
            bool penalised, std::int32_t* tokens, cudaStream_t s);

}  // namespace troupe::cuda
