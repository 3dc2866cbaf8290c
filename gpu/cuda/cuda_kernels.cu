#include "gpu/cuda/cuda_kernels.hpp"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cfloat>
#include <cstdint>
#include <stdexcept>
#include <utility>

#include "gpu/cuda/block_reduce.cuh"
#include "gpu/cuda/cuda_check.hpp"
#include "gpu/cuda/launch.cuh"
#include "gpu/cuda/ngram_cache.cuh"

namespace troupe::cuda {
namespace {

constexpr int threads = 256;
// The GEMVs' blocks: four warps, so an SM holds five blocks of the SwiGLU GEMV (98 registers a
// thread) where it held two of eight warps: finer blocks leave a shorter last wave.
constexpr int gemv_threads = 128;

unsigned blocks_for(std::int64_t n) { return static_cast<unsigned>((n + threads - 1) / threads); }

__device__ float load(dtype type, const void* p, std::int64_t i) {
  switch (type) {
    case dtype::bf16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    case dtype::f16: return __half2float(static_cast<const __half*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

__global__ void f32_to_bf16_kernel(const float* src, __nv_bfloat16* dst, std::int64_t n) {
  follow_previous();
  const std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
  if (i < n) dst[i] = __float2bfloat16_rn(src[i]);
}

__global__ void to_f32_kernel(dtype from, const void* src, float* dst, std::int64_t n) {
  follow_previous();
  const std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
  if (i < n) dst[i] = load(from, src, i);
}

// y[r] = x[r] / rms(x[r]) * w * post_scale, a block per row. With Add, `sum` (rows x_stride
// apart) first gets x added and the norm is of the sum: a residual add and the next norm in one
// pass. Each thread reads back only the columns it wrote.
template <bool Add>
__global__ void rms_norm_kernel(const float* x, std::int64_t x_stride, float* sum, const float* w, float* y,
                                std::int64_t y_stride, std::int64_t cols, float eps, float post_scale) {
  follow_previous();
  __shared__ float shared[32];
  const float* xr = x + blockIdx.x * x_stride;
  float* sr = Add ? sum + blockIdx.x * x_stride : nullptr;
  const float* in = Add ? sr : xr;
  float* yr = y + blockIdx.x * y_stride;
  // Four columns per load where the row allows it: a thread then needs one or two loads.
  const bool by4 = cols % 4 == 0 && ((reinterpret_cast<std::uintptr_t>(xr) | reinterpret_cast<std::uintptr_t>(yr) |
                                       reinterpret_cast<std::uintptr_t>(sr) | reinterpret_cast<std::uintptr_t>(w)) & 15) == 0;
  float ss = 0.0f;
  if (by4) {
    for (std::int64_t c = threadIdx.x; c < cols / 4; c += blockDim.x) {
      float4 v = reinterpret_cast<const float4*>(xr)[c];
      if (Add) {
        const float4 s0 = reinterpret_cast<const float4*>(sr)[c];
        v = make_float4(s0.x + v.x, s0.y + v.y, s0.z + v.z, s0.w + v.w);
        reinterpret_cast<float4*>(sr)[c] = v;
      }
      ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
    }
  } else {
    for (std::int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
      float v = xr[c];
      if (Add) sr[c] = v = sr[c] + v;
      ss += v * v;
    }
  }
  const float inv = rsqrtf(block_reduce<false>(ss, shared) / static_cast<float>(cols) + eps);
  if (by4) {
    for (std::int64_t c = threadIdx.x; c < cols / 4; c += blockDim.x) {
      const float4 v = reinterpret_cast<const float4*>(in)[c], g = reinterpret_cast<const float4*>(w)[c];
      reinterpret_cast<float4*>(yr)[c] = make_float4(g.x * (v.x * inv) * post_scale, g.y * (v.y * inv) * post_scale,
                                                     g.z * (v.z * inv) * post_scale, g.w * (v.w * inv) * post_scale);
    }
  } else {
    for (std::int64_t c = threadIdx.x; c < cols; c += blockDim.x) yr[c] = w[c] * (in[c] * inv) * post_scale;
  }
}

__global__ void layer_norm_kernel(const float* x, float* y, std::int64_t cols, float eps) {
  follow_previous();
  __shared__ float shared[32];
  const float* xr = x + blockIdx.x * cols;
  float* yr = y + blockIdx.x * cols;
  float sum = 0.0f;
  for (std::int64_t c = threadIdx.x; c < cols; c += blockDim.x) sum += xr[c];
  const float mean = block_reduce<false>(sum, shared) / static_cast<float>(cols);
  float var = 0.0f;
  for (std::int64_t c = threadIdx.x; c < cols; c += blockDim.x) var += (xr[c] - mean) * (xr[c] - mean);
  const float inv = rsqrtf(block_reduce<false>(var, shared) / static_cast<float>(cols) + eps);
  for (std::int64_t c = threadIdx.x; c < cols; c += blockDim.x) yr[c] = (xr[c] - mean) * inv;
}

__global__ void scale_kernel(float* y, std::int64_t n, float factor) {
  follow_previous();
  const std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
  if (i < n) y[i] *= factor;
}

__global__ void add_kernel(float* y, const float* x, std::int64_t n) {
  follow_previous();
  const std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
  if (i < n) y[i] += x[i];
}

// SwiGLU of one gate and up value, as the CPU computes it.
__device__ float swiglu_value(float g, float u) { return g / (1.0f + expf(-g)) * u; }

__device__ void store(float* p, float v) { *p = v; }
__device__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }

// out[r, c] = SwiGLU(gate_up[r, c], gate_up[r, f + c]), in float32 or (a tensor-core GEMM's input) bf16.
template <typename Out>
__global__ void swiglu_kernel(const float* gate_up, Out* out, std::int64_t rows, std::int64_t f) {
  follow_previous();
  const std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
  if (i >= rows * f) return;
  const std::int64_t r = i / f, c = i % f;
  store(out + i, swiglu_value(gate_up[r * 2 * f + c], gate_up[r * 2 * f + f + c]));
}

__global__ void gather_rows_kernel(dtype type, const void* table, std::int64_t cols, const std::int64_t* ids, float* out,
                                   std::int64_t n) {
  follow_previous();
  const std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n * cols) return;
  const std::int64_t r = i / cols, c = i % cols;
  out[i] = load(type, table, ids[r] * cols + c);
}

__global__ void scatter_add_rows_kernel(const float* x, const std::int32_t* rows, const float* weights, float* out,
                                        std::int64_t n, std::int64_t cols) {
  follow_previous();
  const std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n * cols) return;
  const std::int64_t r = i / cols, c = i % cols;
  out[static_cast<std::int64_t>(rows[r]) * cols + c] += weights[r] * x[i];
}

// The rotated value of column j of an interleaved rope section `x` (the pair (2i, 2i + 1) turns
// by pos * inv_freq[i]), as the CPU computes it: the angle in float32, then cos and sin.
__device__ float rope_value(const float* x, std::int64_t j, std::int64_t pos, const float* inv_freq, float factor) {
  const std::int64_t i = j / 2;
  const float angle = static_cast<float>(pos) * inv_freq[i];
  const float c = cosf(angle) * factor, s = sinf(angle) * factor, a = x[2 * i], b = x[2 * i + 1];
  return j % 2 == 0 ? a * c - b * s : b * c + a * s;
}

// Asks L2 for the 128-byte line holding p (no register waits for it).
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }

// Eight bf16 weights as floats.
__device__ void unpack_bf16x8(const uint4& packed, float (&wf)[8]) {
  const __nv_bfloat162* pairs = reinterpret_cast<const __nv_bfloat162*>(&packed);
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(pairs[i]);
    wf[2 * i] = f.x;
    wf[2 * i + 1] = f.y;
  }
}

// A warp reads its weight row in rounds: each lane issues up to eight 16-byte streaming loads
// (4 KB per warp) before it uses any. Decode is bound by how many weight bytes are in flight; a
// load-then-use loop would wait a memory latency per 4 KB of the row.
constexpr int dot_unroll = 8;

// Sixteen bytes of weights of type W as floats.
template <typename W>
struct weight_pack;
template <>
struct weight_pack<__nv_bfloat16> {
  static constexpr int n = 8;
  __device__ static void unpack(const uint4& p, float (&f)[8]) { unpack_bf16x8(p, f); }
};
template <>
struct weight_pack<float> {
  static constexpr int n = 4;
  __device__ static void unpack(const uint4& p, float (&f)[4]) {
    f[0] = __uint_as_float(p.x), f[1] = __uint_as_float(p.y), f[2] = __uint_as_float(p.z), f[3] = __uint_as_float(p.w);
  }
};
__device__ float to_float(__nv_bfloat16 w) { return __bfloat162float(w); }
__device__ float to_float(float w) { return w; }

// The round of a lane's loads of `row` starting at column c0 (c0 = lane * per-load + a multiple of
// the round's span); zeros past k. Rows not made of whole 16-byte loads load nothing here.
template <typename W>
__device__ void load_round(const W* row, std::int64_t k, std::int64_t c0, uint4 (&packed)[dot_unroll]) {
  constexpr int per = weight_pack<W>::n;
#pragma unroll
  for (int u = 0; u < dot_unroll; ++u) {
    const std::int64_t c = c0 + u * 32 * per;
    packed[u] = k % per == 0 && c < k ? __ldcs(reinterpret_cast<const uint4*>(row + c)) : make_uint4(0, 0, 0, 0);
  }
}

// dot(row[0:k], x[r, 0:k]) for the M rows of x, by one warp; lane 0 gets the sums. `packed`
// holds the lane's first round, already issued (load_round at lane * per-load), so a kernel can
// send it before it waits for the kernel that writes x.
template <int M, typename W>
__device__ void warp_dot(const W* row, const float* const (&xs)[M], std::int64_t k, uint4 (&packed)[dot_unroll],
                         float (&acc)[M]) {
  constexpr int per = weight_pack<W>::n;
  const int lane = threadIdx.x & 31;
  if (k % per == 0) {
    for (std::int64_t c0 = lane * per; c0 < k; c0 += dot_unroll * 32 * per) {
      if (c0 != lane * per) load_round(row, k, c0, packed);
#pragma unroll
      for (int u = 0; u < dot_unroll; ++u) {
        const std::int64_t c = c0 + u * 32 * per;
        if (c >= k) break;
        float wf[per];
        weight_pack<W>::unpack(packed[u], wf);
#pragma unroll
        for (int r = 0; r < M; ++r)
#pragma unroll
          for (int q = 0; q < per; q += 4) {
            const float4 a = *reinterpret_cast<const float4*>(xs[r] + c + q);
            acc[r] += wf[q] * a.x + wf[q + 1] * a.y + wf[q + 2] * a.z + wf[q + 3] * a.w;
          }
      }
    }
  } else {
    for (std::int64_t c = lane; c < k; c += 32) {
      const float wf = to_float(row[c]);
#pragma unroll
      for (int r = 0; r < M; ++r) acc[r] += wf * xs[r][c];
    }
  }
#pragma unroll
  for (int r = 0; r < M; ++r)
    for (int o = 16; o > 0; o >>= 1) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], o);
}

// The first round of a warp's row (and the later rounds' lines to L2): weights only, so it may
// go out before the kernel waits for the previous one.
template <typename W>
__device__ void prefetch_row(const W* row, std::int64_t k, uint4 (&packed)[dot_unroll]) {
  constexpr int per = weight_pack<W>::n, per_line = 128 / sizeof(W);
  const int lane = threadIdx.x & 31;
  load_round(row, k, lane * per, packed);
  for (std::int64_t c = dot_unroll * 32 * per + lane * per_line; c < k; c += dot_unroll * 32 * per) prefetch_l2(row + c);
}

// One warp per output column, for every row of x at once; its weights' first round goes out
// before the wait for the previous kernel. With Glu the warp reads two rows, gate (col) and up
// (n + col), and writes SwiGLU(gate, up): the MLP's first half without its [M, 2n] intermediate.
// A second matrix (w2 [n2, k] -> y2) may follow the first in the same launch: two projections
// of one input cost one launch's fixed latency.
// (Cutting narrow matrices' rows into slices over more warps measured slower: at these sizes a
// launch costs its fixed latency whatever its width.)
template <int M, typename W, bool Glu>
__global__ void gemv_kernel(const float* x, std::int64_t k, const W* w, std::int64_t n, float* y, bool accumulate,
                            const W* w2, std::int64_t n2, float* y2) {
  std::int64_t col = blockIdx.x * static_cast<std::int64_t>(blockDim.x / 32) + (threadIdx.x >> 5);
  if (col >= n) col -= n, w = w2, n = n2, y = y2;  // a column of the second matrix
  uint4 packed[dot_unroll], packed_up[Glu ? dot_unroll : 1];
  if (col < n) {
    prefetch_row(w + col * k, k, packed);
    if constexpr (Glu) prefetch_row(w + (n + col) * k, k, packed_up);
  }
  follow_previous();
  if (col >= n) return;
  const float* xs[M];
#pragma unroll
  for (int r = 0; r < M; ++r) xs[r] = x + r * k;
  float acc[M] = {}, up[M] = {};
  warp_dot<M>(w + col * k, xs, k, packed, acc);
  if constexpr (Glu) warp_dot<M>(w + (n + col) * k, xs, k, packed_up, up);
  if ((threadIdx.x & 31) != 0) return;
#pragma unroll
  for (int r = 0; r < M; ++r)
    if constexpr (Glu)
      y[r * n + col] = swiglu_value(acc[r], up[r]);
    else
      y[r * n + col] = accumulate ? y[r * n + col] + acc[r] : acc[r];
}

// The n-gram ids of a fused embedding's M rows into ids [E, M] (shared): read, or with the device
// N-gram cache hashed by every block. Then the last block to have hashed advances the contexts
// (no block reads them after its own hash), and block 0 publishes the ids.
template <int M>
__device__ void ngram_embed_ids(const ngram_embed_args& a, std::int64_t* ids) {
  const int e_count = a.num_tables;
  for (int i = threadIdx.x; i < M * e_count; i += blockDim.x) {
    const int t = i / M, r = i % M;
    ids[i] = a.hash.tails ? ngram_table_id(a.hash, r, a.tokens32[r], t) : a.ids[i];
  }
  __syncthreads();
  if (!a.hash.tails || threadIdx.x != 0) return;
  if (blockIdx.x == 0)
    for (int i = 0; i < M * e_count; ++i) a.ids[i] = ids[i];
  __threadfence();
  if (atomicAdd(a.hash.arrivals, 1u) == gridDim.x - 1) {
    for (int r = 0; r < M; ++r) ngram_advance(a.hash, r, a.tokens32[r]);
    *a.hash.arrivals = 0;  // for the next launch, which follows this one on the stream
  }
}

// The n-gram embedding of M <= gemv_max_rows rows in one launch (decode): every block takes the
// rows' n-gram ids (hashing them from the device N-gram cache on decode) and gathers their table
// rows into shared memory ([M, E, d] floats, from L2 after the first block), then each warp owns
// an output column: the bf16 projections' dot products with them, plus the base embedding, times
// the scale. The projections' first loads go out before the wait (weights).
template <int M>
__global__ void ngram_embed_kernel(ngram_embed_args a, float* out) {
  extern __shared__ float gathered[];  // [M, E, d]
  __shared__ std::int64_t ids[M * max_ngram_tables];
  const std::int64_t col = blockIdx.x * static_cast<std::int64_t>(blockDim.x / 32) + (threadIdx.x >> 5);
  const int e_count = a.num_tables, d = static_cast<int>(a.d);
  uint4 packed[dot_unroll];
  const auto* first = static_cast<const __nv_bfloat16*>(a.projections[0]);
  if (col < a.h) prefetch_row(first + col * d, d, packed);
  follow_previous();  // the tokens, ids and contexts come from the kernels and copies before
  ngram_embed_ids<M>(a, ids);
  for (int i = threadIdx.x; i < M * e_count * d; i += blockDim.x) {
    const int r = i / (e_count * d), t = (i / d) % e_count, c = i % d;
    gathered[i] = load(a.table_type, a.tables[t], ids[t * M + r] * d + c);
  }
  __syncthreads();
  if (col >= a.h) return;
  float acc[M] = {};
  for (int t = 0; t < e_count; ++t) {
    const auto* row = static_cast<const __nv_bfloat16*>(a.projections[t]) + col * d;
    if (t > 0) prefetch_row(row, d, packed);
    const float* xs[M];
#pragma unroll
    for (int r = 0; r < M; ++r) xs[r] = gathered + (r * e_count + t) * d;
    float part[M] = {};
    warp_dot<M>(row, xs, d, packed, part);
#pragma unroll
    for (int r = 0; r < M; ++r) acc[r] += part[r];
  }
  if ((threadIdx.x & 31) != 0) return;
#pragma unroll
  for (int r = 0; r < M; ++r)
    out[r * a.h + col] = (load(a.base_type, a.base, a.tokens[r] * a.h + col) + acc[r]) * a.scale;
}

// The routed slots grouped by expert, by one block: order[offsets[e] .. offsets[e + 1]) are the
// slots whose expert is e (< n_routed; zero experts have no GEMVs), and active[] lists the
// experts with slots (then -1s), so the GEMVs launch blocks only for those. Counting sort with
// `next` [n_routed] in shared memory; the order within an expert does not matter (each slot's
// output is its own).
__device__ void group_slots_block(const std::int32_t* idx, std::int64_t slots, std::int32_t n_routed, std::int32_t* next,
                                  std::int32_t* offsets, std::int32_t* order, std::int32_t* active) {
  for (std::int32_t e = threadIdx.x; e < n_routed; e += blockDim.x) next[e] = 0;
  __syncthreads();
  for (std::int64_t s = threadIdx.x; s < slots; s += blockDim.x)
    if (idx[s] < n_routed) atomicAdd(&next[idx[s]], 1);
  __syncthreads();
  if (threadIdx.x == 0) {
    std::int32_t running = 0, used = 0;
    for (std::int32_t e = 0; e < n_routed; ++e) {
      const std::int32_t count = next[e];
      if (count) active[used++] = e;
      offsets[e] = next[e] = running;
      running += count;
    }
    offsets[n_routed] = running;
    for (std::int32_t e = used; e < n_routed; ++e) active[e] = -1;
  }
  __syncthreads();
  for (std::int64_t s = threadIdx.x; s < slots; s += blockDim.x)
    if (idx[s] < n_routed) order[atomicAdd(&next[idx[s]], 1)] = static_cast<std::int32_t>(s);
}

// The slots [c0, c0 + M) of one expert's group (a ragged tail repeats its first slot) against
// one weight row (with Glu: the gate row and the up row n rows below it); lane 0 writes the
// outputs of the real slots.
template <int M, bool Glu>
__device__ void expert_rows(const float* x, std::int64_t x_row_div, const std::int32_t* order, std::int32_t c0,
                            std::int32_t end, const __nv_bfloat16* row, std::int64_t col, std::int64_t n, std::int64_t k,
                            float* y) {
  const float* xs[M];
#pragma unroll
  for (int r = 0; r < M; ++r) xs[r] = x + (order[c0 + r < end ? c0 + r : c0] / x_row_div) * k;
  float acc[M] = {}, up[M] = {};
  uint4 packed[dot_unroll], packed_up[Glu ? dot_unroll : 1];
  const int first = (threadIdx.x & 31) * weight_pack<__nv_bfloat16>::n;
  load_round(row, k, first, packed);
  if constexpr (Glu) load_round(row + n * k, k, first, packed_up);
  warp_dot<M>(row, xs, k, packed, acc);
  if constexpr (Glu) warp_dot<M>(row + n * k, xs, k, packed_up, up);
  if ((threadIdx.x & 31) == 0)
#pragma unroll
    for (int r = 0; r < M; ++r)
      if (c0 + r < end) y[static_cast<std::int64_t>(order[c0 + r]) * n + col] = Glu ? swiglu_value(acc[r], up[r]) : acc[r];
}

// y[s, :n] = W_e[n, k] . x[s / x_row_div] for every slot s of expert e = active[blockIdx.y] (with
// Glu: SwiGLU of W_e's gate rows [0, n) and up rows [n, 2n)): a warp per (output column, expert)
// reads the weight rows once from memory for all of the expert's slots, up to four at a time
// (they stay in L1 between them). MaxRows bounds a group (an expert has at most one slot per
// row of the step), so a decode step compiles to the one-slot dot alone: the wider
// instantiations' registers would cut the blocks an SM holds.
template <int MaxRows, bool Glu>
__global__ void grouped_expert_gemv_kernel(const float* x, std::int64_t x_row_div, const std::int32_t* offsets,
                                           const std::int32_t* order, const std::int32_t* active,
                                           const __nv_bfloat16* const* weights, std::int64_t n, std::int64_t k, float* y) {
  follow_previous();
  const std::int64_t col = blockIdx.x * static_cast<std::int64_t>(blockDim.x / 32) + (threadIdx.x >> 5);
  const std::int32_t e = active[blockIdx.y];
  if (col >= n || e < 0) return;
  const std::int32_t begin = offsets[e], end = offsets[e + 1];
  const __nv_bfloat16* row = weights[e] + col * k;
  for (std::int32_t c0 = begin; c0 < end; c0 += MaxRows) {
    const std::int32_t rows = end - c0;  // warp-uniform
    if (MaxRows == 1 || rows == 1)
      expert_rows<1, Glu>(x, x_row_div, order, c0, end, row, col, n, k, y);
    else if (MaxRows == 2 || rows == 2)
      expert_rows<MaxRows < 2 ? 1 : 2, Glu>(x, x_row_div, order, c0, end, row, col, n, k, y);
    else if (MaxRows == 4 || rows <= 4)
      expert_rows<MaxRows < 4 ? 1 : 4, Glu>(x, x_row_div, order, c0, end, row, col, n, k, y);
    else
      expert_rows<MaxRows, Glu>(x, x_row_div, order, c0, end, row, col, n, k, y);
  }
}

__global__ void moe_combine_kernel(const float* u, const float* y, const std::int32_t* idx, const float* gates,
                                   std::int64_t rows, int k, std::int32_t n_routed, std::int64_t h, bool accumulate, float* out) {
  follow_previous();
  const std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
  if (i >= rows * h) return;
  const std::int64_t t = i / h, c = i % h;
  float sum = 0.0f;
  for (int j = 0; j < k; ++j) {
    const std::int64_t slot = t * k + j;
    sum += gates[slot] * (idx[slot] < n_routed ? y[slot * h + c] : u[i]);
  }
  out[i] = accumulate ? out[i] + sum : sum;
}

// The latent row of sequence `seq` at position `pos` in a paged cache.
__device__ const float* latent_row(const paged_args& c, std::int32_t seq, std::int64_t pos) {
  const auto* block = reinterpret_cast<const float*>(c.block_table[seq * c.max_blocks + pos / c.block_tokens]);
  return block + (pos % c.block_tokens) * c.width;
}

// A block per new row: the norm of the compressed latent, the rotation of its rope columns, and
// the row stored in kv and in its place in the cache.
__global__ void write_latents_kernel(float* kv, latent_args l, paged_args c) {
  follow_previous();
  __shared__ float shared[32];
  __shared__ float rope_in[max_rope_dim];
  float* x = kv + blockIdx.x * c.width;
  const std::int64_t rope = c.width - l.kv_lora, pos = c.positions[blockIdx.x];
  float* dst = const_cast<float*>(latent_row(c, c.row_seq[blockIdx.x], pos));
  float ss = 0.0f;
  for (std::int64_t i = threadIdx.x; i < l.kv_lora; i += blockDim.x) ss += x[i] * x[i];
  for (std::int64_t j = threadIdx.x; j < rope; j += blockDim.x) rope_in[j] = x[l.kv_lora + j];
  const float inv = rsqrtf(block_reduce<false>(ss, shared) / static_cast<float>(l.kv_lora) + l.eps);  // syncs rope_in too
  for (std::int64_t i = threadIdx.x; i < l.kv_lora; i += blockDim.x) dst[i] = x[i] = (l.norm[i] * (x[i] * inv)) * l.post_scale;
  for (std::int64_t j = threadIdx.x; j < rope; j += blockDim.x)
    dst[l.kv_lora + j] = x[l.kv_lora + j] = rope_value(rope_in, j, pos, l.inv_freq, l.attention_factor);
}

template <bool Max>
__device__ float warp_reduce(float v) {
  for (int o = 16; o > 0; o >>= 1) {
    const float other = __shfl_xor_sync(0xffffffffu, v, o);
    v = Max ? fmaxf(v, other) : v + other;
  }
  return v;
}

// MLA attention. Decode and verification take one kernel (mla_decode_kernel) in the absorbed
// form, its keys spread over the block's warps and its weight reads kept in flight; prefill runs
// un-absorbed on tensor cores (the mla_prefill_* kernels below and cuBLAS).
constexpr int mla_max_lane_values = 18;  // latent row values per lane: kv_lora + rope <= 576

// MLA for decode and verification in one kernel, a block per (row, head), so a layer's
// attention is one launch (three launches cost more than the block's weight reads here):
//  1. absorb: q_lat = [q_nope . W_k[h] | RoPE(q_rope)], a thread per latent column, the loads of
//     W_k[h] (nope x kv_lora floats) in flight 32 at a time (the head's weights were sent to L2
//     before the kernel waited for the previous one);
//  2. flash-decoding over the row's visible keys: each warp takes every 16th key, reads its
//     latent row once (the next already in flight), scores it and folds it into a running
//     softmax-weighted sum (online softmax); the warps' partial sums are merged in shared memory;
//  3. expand: out[r, h] = out_lat . W_v[h]^T, a warp per output column.
constexpr int mla_decode_threads = 512;

template <typename KV>
__global__ void __launch_bounds__(mla_decode_threads) mla_decode_kernel(mla_args a) {
  extern __shared__ float smem[];
  const std::int64_t r = blockIdx.x, h = blockIdx.y, width = a.kv_lora + a.rope, qk = a.nope + a.rope;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  float* q = smem;                  // [width]: the query as a latent row
  float* q_in = q + width;          // [nope + rope]: the row's query for head h
  float* part_m = q_in + qk;        // [warps]
  float* part_l = part_m + warps;   // [warps]
  float* part = part_l + warps;     // [warps, kv_lora]; then out_lat in its first kv_lora
  const KV* w_k = static_cast<const KV*>(a.kv_b) + h * (a.nope + a.v) * a.kv_lora;  // [nope, kv_lora]
  const KV* w_v = w_k + a.nope * a.kv_lora;                                         // [v, kv_lora]
  // The head's weights are one block of kv_b: into L2 while the previous kernel finishes.
  constexpr std::int64_t per_line = 128 / sizeof(KV);
  for (std::int64_t i = threadIdx.x * per_line; i < (a.nope + a.v) * a.kv_lora; i += blockDim.x * per_line)
    prefetch_l2(w_k + i);
  follow_previous();
  const std::int64_t pos = a.cache.positions[r];
  for (std::int64_t i = threadIdx.x; i < qk; i += blockDim.x) q_in[i] = a.q[(r * a.heads + h) * qk + i];
  __syncthreads();
  for (std::int64_t c = threadIdx.x; c < a.kv_lora; c += blockDim.x) {
    float sum = 0.0f;
#pragma unroll 32
    for (std::int64_t n = 0; n < a.nope; ++n) sum += q_in[n] * to_float(w_k[n * a.kv_lora + c]);
    q[c] = sum;
  }
  for (std::int64_t j = threadIdx.x; j < a.rope; j += blockDim.x)
    q[a.kv_lora + j] = rope_value(q_in + a.nope, j, pos, a.inv_freq, a.attention_factor);
  __syncthreads();

  const std::int32_t seq = a.cache.row_seq[r];
  const std::int64_t visible = pos + 1;  // causal
  float m = -INFINITY, l = 0.0f, acc[mla_max_lane_values] = {}, v[mla_max_lane_values], next[mla_max_lane_values];
  auto load = [&](std::int64_t j, float (&dst)[mla_max_lane_values]) {
    const float* lat = latent_row(a.cache, seq, j);
#pragma unroll
    for (int i = 0; i < mla_max_lane_values; ++i) {
      const std::int64_t c = lane + 32 * i;
      dst[i] = c < width ? lat[c] : 0.0f;
    }
  };
  if (warp < visible) load(warp, next);
  for (std::int64_t j = warp; j < visible; j += warps) {
#pragma unroll
    for (int i = 0; i < mla_max_lane_values; ++i) v[i] = next[i];
    if (j + warps < visible) load(j + warps, next);
    float sc = 0.0f;
#pragma unroll
    for (int i = 0; i < mla_max_lane_values; ++i) {
      const std::int64_t c = lane + 32 * i;
      if (c < width) sc += q[c] * v[i];
    }
    sc = warp_reduce<false>(sc) * a.softmax_scale;
    const float m_new = fmaxf(m, sc), keep = expf(m - m_new), p = expf(sc - m_new);
    l = l * keep + p;
#pragma unroll
    for (int i = 0; i < mla_max_lane_values; ++i) acc[i] = acc[i] * keep + p * v[i];
    m = m_new;
  }
  if (lane == 0) part_m[warp] = m, part_l[warp] = l;
#pragma unroll
  for (int i = 0; i < mla_max_lane_values; ++i) {
    const std::int64_t c = lane + 32 * i;
    if (c < a.kv_lora) part[warp * a.kv_lora + c] = acc[i];
  }
  __syncthreads();
  float top = -INFINITY;
  for (int w = 0; w < warps; ++w) top = fmaxf(top, part_m[w]);
  float total = 0.0f;
  for (int w = 0; w < warps; ++w) total += part_l[w] * expf(part_m[w] - top);
  const float inv = 1.0f / total;
  float* out_lat = part;  // column c is read and written by one thread only
  for (std::int64_t c = threadIdx.x; c < a.kv_lora; c += blockDim.x) {
    float sum = 0.0f;
    for (int w = 0; w < warps; ++w) sum += part[w * a.kv_lora + c] * expf(part_m[w] - top);
    out_lat[c] = sum * inv;
  }
  __syncthreads();

  for (std::int64_t c = warp; c < a.v; c += warps) {
    const KV* row = w_v + c * a.kv_lora;
    float sum = 0.0f;
#pragma unroll 16
    for (std::int64_t k = lane; k < a.kv_lora; k += 32) sum += out_lat[k] * to_float(row[k]);
    sum = warp_reduce<false>(sum);
    if (lane == 0) a.out[(r * a.heads + h) * a.v + c] = sum;
  }
}

// Prefill attention's operands (mla_prefill_*, then mla_flash.cu): MLA un-absorbed, as
// multi-head attention with 192-wide keys (k_nope | shared rotated k_rope) and 128-wide values,
// decompressed from one sequence's cached latents by one GEMM. These kernels move rows into the
// flash kernel's padded bf16 layouts (mla_prefill_shape), zeros in the padding.

// lat[j, 0:kv_lora] = latent row j of sequence `seq` (its normed compressed part).
__global__ void mla_prefill_gather_kernel(paged_args c, std::int32_t seq, std::int64_t kv_lora, float* lat) {
  follow_previous();
  const float* row = latent_row(c, seq, blockIdx.x);
  for (std::int64_t i = threadIdx.x; i < kv_lora; i += blockDim.x) lat[blockIdx.x * kv_lora + i] = row[i];
}

// For key j of head h: k[h, j] = [kvd[j, h, 0:nope] | latent rope columns], vt[h, :, j] = kvd[j, h, nope:].
__global__ void mla_prefill_keys_kernel(paged_args c, std::int32_t seq, const float* kvd, mla_prefill_shape p,
                                        std::int64_t kv_lora, __nv_bfloat16* k, __nv_bfloat16* vt) {
  follow_previous();
  const std::int64_t j = blockIdx.x, h = blockIdx.y, qk = p.nope + p.rope;
  const bool real = j < p.keys;
  const float* src = real ? kvd + (j * p.heads + h) * (p.nope + p.v) : nullptr;
  const float* lat = real ? latent_row(c, seq, j) : nullptr;
  __nv_bfloat16* kd = k + (h * p.keys_pad + j) * p.qk_pad;
  for (std::int64_t i = threadIdx.x; i < p.qk_pad; i += blockDim.x)
    kd[i] = __float2bfloat16(!real || i >= qk ? 0.0f : i < p.nope ? src[i] : lat[kv_lora + i - p.nope]);
  for (std::int64_t i = threadIdx.x; i < p.v_pad; i += blockDim.x)
    vt[(h * p.v_pad + i) * p.keys_pad + j] = __float2bfloat16(real && i < p.v ? src[p.nope + i] : 0.0f);
}

// q_out[h, i] = [q_nope | RoPE(q_rope) at the row's position] of row row_ids[i].
__global__ void mla_prefill_queries_kernel(const float* q, const std::int64_t* positions, const std::int32_t* row_ids,
                                           mla_prefill_shape p, const float* inv_freq, float factor,
                                           __nv_bfloat16* q_out) {
  follow_previous();
  const std::int64_t i = blockIdx.x, h = blockIdx.y, qk = p.nope + p.rope;
  const bool real = i < p.rows;
  const float* src = real ? q + (row_ids[i] * p.heads + h) * qk : nullptr;
  const std::int64_t pos = real ? positions[row_ids[i]] : 0;
  __nv_bfloat16* dst = q_out + (h * p.rows_pad + i) * p.qk_pad;
  for (std::int64_t c = threadIdx.x; c < p.qk_pad; c += blockDim.x)
    dst[c] = __float2bfloat16(!real || c >= qk ? 0.0f
                              : c < p.nope  ? src[c]
                                            : rope_value(src + p.nope, c - p.nope, pos, inv_freq, factor));
}

// Router top-k of one row by one warp, in registers: lane l holds experts l, l + 32, ...;
// softmax across the lanes, then k rounds of a warp-wide argmax of the biased scores not yet
// taken (ties: the lower id). Lane 0 writes idx[0..k) and weights[0..k).
constexpr int router_max_per_lane = 8;  // up to 256 experts

__device__ void warp_topk(const float* l, const float* bias, std::int64_t experts, int k, float scaling, std::int32_t* idx,
                          float* weights) {
  const int lane = threadIdx.x & 31;
  float p[router_max_per_lane], choice[router_max_per_lane];
  float mx = -FLT_MAX;
#pragma unroll
  for (int i = 0; i < router_max_per_lane; ++i) {
    const std::int64_t e = lane + 32 * i;
    p[i] = e < experts ? l[e] : -FLT_MAX;
    mx = fmaxf(mx, p[i]);
  }
  mx = warp_reduce<true>(mx);
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < router_max_per_lane; ++i) {
    p[i] = lane + 32 * i < experts ? expf(p[i] - mx) : 0.0f;
    sum += p[i];
  }
  const float inv = 1.0f / warp_reduce<false>(sum);
#pragma unroll
  for (int i = 0; i < router_max_per_lane; ++i) {
    const std::int64_t e = lane + 32 * i;
    p[i] *= inv;
    choice[i] = e < experts ? p[i] + bias[e] : -INFINITY;
  }
  for (int j = 0; j < k; ++j) {
    float best = -INFINITY, best_p = 0.0f;
    std::int32_t best_e = -1;
#pragma unroll
    for (int i = 0; i < router_max_per_lane; ++i)
      if (choice[i] > best) best = choice[i], best_p = p[i], best_e = lane + 32 * i;
    for (int o = 16; o > 0; o >>= 1) {
      const float ob = __shfl_xor_sync(0xffffffffu, best, o), op = __shfl_xor_sync(0xffffffffu, best_p, o);
      const std::int32_t oe = __shfl_xor_sync(0xffffffffu, best_e, o);
      if (oe >= 0 && (best_e < 0 || ob > best || (ob == best && oe < best_e))) best = ob, best_p = op, best_e = oe;
    }
    if (best_e < 0) best_e = 0, best_p = 0.0f;  // NaN logits: no score compares; keep the index in range
    if (lane == 0) idx[j] = best_e, weights[j] = best_p * scaling;
#pragma unroll
    for (int i = 0; i < router_max_per_lane; ++i)  // the owner marks it taken (a constant index keeps choice in registers)
      if (lane + 32 * i == best_e) choice[i] = -INFINITY;
  }
}

__global__ void router_topk_kernel(const float* logits, const float* bias, std::int64_t rows, std::int64_t experts, int k,
                                   float scaling, std::int32_t* idx, float* weights) {
  follow_previous();
  const std::int64_t r = blockIdx.x * static_cast<std::int64_t>(blockDim.x >> 5) + (threadIdx.x >> 5);
  if (r >= rows) return;  // whole warps leave together
  warp_topk(logits + r * experts, bias, experts, k, scaling, idx + r * k, weights + r * k);
}

// The routing of routed_moe in one block: each row's top-k of the router's logits (a warp per
// row), then the slots grouped by expert (group_slots_block). (The router's GEMV stays a kernel
// of its own: read by one block, its matrix took longer than the launch it saves.)
__global__ void moe_route_kernel(const float* logits, std::int64_t rows, const float* bias, std::int64_t experts, int k,
                                 float scaling, std::int32_t n_routed, std::int32_t* idx, float* gates, std::int32_t* offsets,
                                 std::int32_t* order, std::int32_t* active) {
  extern __shared__ std::int32_t next[];  // [n_routed]
  follow_previous();
  for (std::int64_t r = threadIdx.x >> 5; r < rows; r += blockDim.x >> 5)
    warp_topk(logits + r * experts, bias, experts, k, scaling, idx + r * k, gates + r * k);
  __syncthreads();  // idx written by this block: visible to all of its threads now
  group_slots_block(idx, rows * k, n_routed, next, offsets, order, active);
}

// The routed MoE beyond gemv_max_rows on tensor cores (moe_dispatch / moe_undispatch around
// two batched cuBLAS GEMMs): expert e's slots become rows [e * cap, e * cap + count_e) of a
// padded bf16 matrix (the padding zeros), and come back to slot order after the GEMMs.
__global__ void moe_dispatch_kernel(const float* u, std::int64_t h, int k, const std::int32_t* offsets,
                                    const std::int32_t* order, std::int64_t cap, __nv_bfloat16* x) {
  follow_previous();
  const std::int64_t e = blockIdx.x, j = blockIdx.y;
  const std::int32_t begin = offsets[e], count = offsets[e + 1] - begin;
  __nv_bfloat16* dst = x + (e * cap + j) * h;
  const float* src = j < count ? u + static_cast<std::int64_t>(order[begin + j] / k) * h : nullptr;
  for (std::int64_t c = threadIdx.x; c < h; c += blockDim.x) dst[c] = __float2bfloat16(src ? src[c] : 0.0f);
}

// y[s] = out_rows[e * cap + j] for the j-th slot s of expert e.
__global__ void moe_undispatch_kernel(const float* out_rows, std::int64_t h, const std::int32_t* offsets,
                                      const std::int32_t* order, std::int64_t cap, float* y) {
  follow_previous();
  const std::int64_t e = blockIdx.x, j = blockIdx.y;
  const std::int32_t begin = offsets[e];
  if (j >= offsets[e + 1] - begin) return;
  const float* src = out_rows + (e * cap + j) * h;
  float* dst = y + static_cast<std::int64_t>(order[begin + j]) * h;
  for (std::int64_t c = threadIdx.x; c < h; c += blockDim.x) dst[c] = src[c];
}

// The batched GEMMs' pointer arrays: expert e's slice of each padded buffer.
__global__ void moe_gemm_pointers_kernel(std::int32_t n_routed, const void* x, std::int64_t x_stride, void* gate_up,
                                         std::int64_t gate_up_stride, const void* act, std::int64_t act_stride, void* out,
                                         std::int64_t out_stride, const void** ptrs) {
  follow_previous();
  const std::int32_t e = static_cast<std::int32_t>(threadIdx.x);
  if (e >= n_routed) return;
  ptrs[e] = static_cast<const __nv_bfloat16*>(x) + e * x_stride;
  ptrs[n_routed + e] = static_cast<float*>(gate_up) + e * gate_up_stride;
  ptrs[2 * n_routed + e] = static_cast<const __nv_bfloat16*>(act) + e * act_stride;
  ptrs[3 * n_routed + e] = static_cast<float*>(out) + e * out_stride;
}

}  // namespace

void f32_to_bf16(const float* src, std::uint16_t* dst, std::int64_t n, cudaStream_t s) {
  if (n == 0) return;
  launch(f32_to_bf16_kernel, blocks_for(n), threads, 0, s, src, reinterpret_cast<__nv_bfloat16*>(dst), n);
}

void to_f32(dtype from, const void* src, float* dst, std::int64_t n, cudaStream_t s) {
  if (n == 0) return;
  launch(to_f32_kernel, blocks_for(n), threads, 0, s, from, src, dst, n);
}

namespace {
template <typename W, bool Glu>
void launch_gemv(const float* x, std::int64_t m, std::int64_t k, const W* w, std::int64_t n, float* y, bool accumulate,
                 const W* w2, std::int64_t n2, float* y2, cudaStream_t s) {
  static_assert(gemv_max_rows == 4, "one instantiation per row count below");
  const unsigned warps = gemv_threads / 32, grid = static_cast<unsigned>((n + n2 + warps - 1) / warps);
  switch (m) {
#define TROUPE_GEMV_CASE(M) \
  case M: launch(gemv_kernel<M, W, Glu>, grid, gemv_threads, 0, s, x, k, w, n, y, accumulate, w2, n2, y2); break;
    TROUPE_GEMV_CASE(1) TROUPE_GEMV_CASE(2) TROUPE_GEMV_CASE(3) TROUPE_GEMV_CASE(4)
#undef TROUPE_GEMV_CASE
  }
}
}  // namespace

void gemv(const float* x, std::int64_t m, std::int64_t k, dtype wt, const void* w, std::int64_t n, float* y, bool accumulate,
          cudaStream_t s) {
  if (m == 0 || n == 0) return;
  if (m > gemv_max_rows) throw std::logic_error("gemv: more rows than gemv_max_rows");
  if (wt == dtype::bf16)
    launch_gemv<__nv_bfloat16, false>(x, m, k, static_cast<const __nv_bfloat16*>(w), n, y, accumulate, nullptr, 0, nullptr, s);
  else if (wt == dtype::f32)
    launch_gemv<float, false>(x, m, k, static_cast<const float*>(w), n, y, accumulate, nullptr, 0, nullptr, s);
  else
    throw std::invalid_argument("gemv: weights must be bf16 or f32");
}

void gemv_pair_bf16(const float* x, std::int64_t m, std::int64_t k, const std::uint16_t* w1, std::int64_t n1, float* y1,
                    const std::uint16_t* w2, std::int64_t n2, float* y2, cudaStream_t s) {
  if (m == 0) return;
  if (m > gemv_max_rows) throw std::logic_error("gemv_pair_bf16: more rows than gemv_max_rows");
  launch_gemv<__nv_bfloat16, false>(x, m, k, reinterpret_cast<const __nv_bfloat16*>(w1), n1, y1, false,
                                    reinterpret_cast<const __nv_bfloat16*>(w2), n2, y2, s);
}

void gemv_swiglu_bf16(const float* x, std::int64_t m, std::int64_t k, const std::uint16_t* w, std::int64_t f, float* act,
                      cudaStream_t s) {
  if (m == 0 || f == 0) return;
  if (m > gemv_max_rows) throw std::logic_error("gemv_swiglu_bf16: more rows than gemv_max_rows");
  launch_gemv<__nv_bfloat16, true>(x, m, k, reinterpret_cast<const __nv_bfloat16*>(w), f, act, false, nullptr, 0, nullptr, s);
}

void moe_route(const float* logits, std::int64_t rows, const float* bias, std::int64_t experts, int k, float scaling,
               std::int32_t n_routed, std::int32_t* idx, float* gates, std::int32_t* offsets, std::int32_t* order,
               std::int32_t* active, cudaStream_t s) {
  if (rows == 0) return;
  if (experts > 32 * router_max_per_lane)
    throw std::invalid_argument("moe_route: " + std::to_string(experts) + " experts (at most " +
                                std::to_string(32 * router_max_per_lane) + ")");
  launch(moe_route_kernel, 1, 1024, static_cast<std::size_t>(n_routed) * sizeof(std::int32_t), s, logits, rows, bias, experts,
         k, scaling, n_routed, idx, gates, offsets, order, active);
}

bool ngram_embed_fits(std::int64_t m, int num_tables, std::int64_t d) {
  // 48 KB of shared memory in all: the gathered rows and the ids.
  const auto ids_bytes = static_cast<std::int64_t>(gemv_max_rows * max_ngram_tables * sizeof(std::int64_t));
  return m >= 1 && m <= gemv_max_rows && num_tables >= 1 && num_tables <= max_ngram_tables &&
         m * num_tables * d * static_cast<std::int64_t>(sizeof(float)) <= 48 * 1024 - ids_bytes;
}

void ngram_embed(const ngram_embed_args& args, std::int64_t m, float* out, cudaStream_t s) {
  if (!ngram_embed_fits(m, args.num_tables, args.d)) throw std::logic_error("ngram_embed: shape outside ngram_embed_fits");
  static_assert(gemv_max_rows == 4, "one instantiation per row count below");
  const unsigned warps = threads / 32, grid = static_cast<unsigned>((args.h + warps - 1) / warps);
  const auto shared = static_cast<std::size_t>(m * args.num_tables * args.d) * sizeof(float);
  switch (m) {
#define TROUPE_NGRAM_CASE(M) \
  case M: launch(ngram_embed_kernel<M>, grid, threads, shared, s, args, out); break;
    TROUPE_NGRAM_CASE(1) TROUPE_NGRAM_CASE(2) TROUPE_NGRAM_CASE(3) TROUPE_NGRAM_CASE(4)
#undef TROUPE_NGRAM_CASE
  }
}

void grouped_expert_gemv_bf16(const float* x, std::int64_t x_row_div, std::int64_t max_group, const std::int32_t* offsets,
                              const std::int32_t* order, const std::int32_t* active, std::int32_t max_active,
                              const std::uint16_t* const* weights, std::int64_t n, std::int64_t k, bool swiglu, float* y,
                              cudaStream_t s) {
  if (n == 0 || max_active == 0) return;
  const unsigned warps = gemv_threads / 32;
  const dim3 grid(static_cast<unsigned>((n + warps - 1) / warps), static_cast<unsigned>(max_active));
  const auto* w = reinterpret_cast<const __nv_bfloat16* const*>(weights);
#define TROUPE_GROUPED_CASE(MAX_ROWS)                                                                                    \
  (swiglu ? launch(grouped_expert_gemv_kernel<MAX_ROWS, true>, grid, gemv_threads, 0, s, x, x_row_div, offsets, order,    \
                   active, w, n, k, y)                                                                                     \
          : launch(grouped_expert_gemv_kernel<MAX_ROWS, false>, grid, gemv_threads, 0, s, x, x_row_div, offsets, order,   \
                   active, w, n, k, y))
  if (max_group <= 1)
    TROUPE_GROUPED_CASE(1);
  else if (max_group <= 2)
    TROUPE_GROUPED_CASE(2);
  else
    TROUPE_GROUPED_CASE(4);
#undef TROUPE_GROUPED_CASE
}

void moe_dispatch(const float* u, std::int64_t h, int k, const std::int32_t* offsets, const std::int32_t* order,
                  std::int32_t n_routed, std::int64_t cap, std::uint16_t* x, cudaStream_t s) {
  launch(moe_dispatch_kernel, dim3(static_cast<unsigned>(n_routed), static_cast<unsigned>(cap)), threads, 0, s, u, h, k,
         offsets, order, cap, reinterpret_cast<__nv_bfloat16*>(x));
}

void moe_undispatch(const float* out_rows, std::int64_t h, const std::int32_t* offsets, const std::int32_t* order,
                    std::int32_t n_routed, std::int64_t cap, float* y, cudaStream_t s) {
  launch(moe_undispatch_kernel, dim3(static_cast<unsigned>(n_routed), static_cast<unsigned>(cap)), threads, 0, s, out_rows, h,
         offsets, order, cap, y);
}

void moe_gemm_pointers(std::int32_t n_routed, const void* x, std::int64_t x_stride, void* gate_up, std::int64_t gate_up_stride,
                       const void* act, std::int64_t act_stride, void* out, std::int64_t out_stride, const void** ptrs,
                       cudaStream_t s) {
  if (n_routed > 1024) throw std::invalid_argument("moe_gemm_pointers: more than 1024 routed experts");
  launch(moe_gemm_pointers_kernel, 1, static_cast<unsigned>(n_routed), 0, s, n_routed, x, x_stride, gate_up, gate_up_stride,
         act, act_stride, out, out_stride, ptrs);
}

void moe_combine(const float* u, const float* y, const std::int32_t* idx, const float* gates, std::int64_t rows, int k,
                 std::int32_t n_routed, std::int64_t h, bool accumulate, float* out, cudaStream_t s) {
  if (rows * h == 0) return;
  launch(moe_combine_kernel, blocks_for(rows * h), threads, 0, s, u, y, idx, gates, rows, k, n_routed, h, accumulate, out);
}

namespace {
// Enough threads for one float4 each, up to 1024: a row's loads go out at once.
unsigned norm_threads(std::int64_t cols) {
  return static_cast<unsigned>(std::min<std::int64_t>(1024, std::max<std::int64_t>(32, (cols / 4 + 31) / 32 * 32)));
}
}  // namespace

void rms_norm(const float* x, std::int64_t x_stride, const float* w, float* y, std::int64_t y_stride, std::int64_t rows,
              std::int64_t cols, float eps, float post_scale, cudaStream_t s) {
  if (rows == 0) return;
  launch(rms_norm_kernel<false>, static_cast<unsigned>(rows), norm_threads(cols), 0, s, x, x_stride, nullptr, w, y, y_stride, cols,
                                                                                    eps, post_scale);
}

void add_rms_norm(float* y, const float* x, const float* w, float* normed, std::int64_t rows, std::int64_t cols, float eps,
                  cudaStream_t s) {
  if (rows == 0) return;
  launch(rms_norm_kernel<true>, static_cast<unsigned>(rows), norm_threads(cols), 0, s, x, cols, y, w, normed, cols, cols, eps, 1.0f);
}

void layer_norm(const float* x, float* y, std::int64_t rows, std::int64_t cols, float eps, cudaStream_t s) {
  if (rows == 0) return;
  launch(layer_norm_kernel, static_cast<unsigned>(rows), threads, 0, s, x, y, cols, eps);
}

void scale(float* y, std::int64_t n, float factor, cudaStream_t s) {
  if (n == 0) return;
  launch(scale_kernel, blocks_for(n), threads, 0, s, y, n, factor);
}

void add(float* y, const float* x, std::int64_t n, cudaStream_t s) {
  if (n == 0) return;
  launch(add_kernel, blocks_for(n), threads, 0, s, y, x, n);
}

void swiglu(const float* gate_up, float* out, std::int64_t rows, std::int64_t f, cudaStream_t s) {
  if (rows * f == 0) return;
  launch(swiglu_kernel<float>, blocks_for(rows * f), threads, 0, s, gate_up, out, rows, f);
}

void swiglu_to_bf16(const float* gate_up, std::uint16_t* out, std::int64_t rows, std::int64_t f, cudaStream_t s) {
  if (rows * f == 0) return;
  launch(swiglu_kernel<__nv_bfloat16>, blocks_for(rows * f), threads, 0, s, gate_up, reinterpret_cast<__nv_bfloat16*>(out),
         rows, f);
}

void gather_rows(dtype type, const void* table, std::int64_t cols, const std::int64_t* ids, float* out, std::int64_t n,
                 cudaStream_t s) {
  if (n * cols == 0) return;
  launch(gather_rows_kernel, blocks_for(n * cols), threads, 0, s, type, table, cols, ids, out, n);
}

void scatter_add_rows(const float* x, const std::int32_t* rows, const float* weights, float* out, std::int64_t n,
                      std::int64_t cols, cudaStream_t s) {
  if (n * cols == 0) return;
  launch(scatter_add_rows_kernel, blocks_for(n * cols), threads, 0, s, x, rows, weights, out, n, cols);
}

void write_latents(float* kv, std::int64_t rows, const latent_args& l, const paged_args& cache, cudaStream_t s) {
  if (rows == 0) return;
  if (cache.width - l.kv_lora > max_rope_dim)
    throw std::invalid_argument("write_latents: " + std::to_string(cache.width - l.kv_lora) + " rope columns (at most " +
                                std::to_string(max_rope_dim) + ")");
  launch(write_latents_kernel, static_cast<unsigned>(rows), threads, 0, s, kv, l, cache);
}

void mla_attention(const mla_args& a, cudaStream_t s) {
  if (a.rows == 0) return;
  const std::int64_t width = a.kv_lora + a.rope;
  if (width > 32 * mla_max_lane_values)
    throw std::invalid_argument("mla_attention: latent rows of " + std::to_string(width) + " values (at most " +
                                std::to_string(32 * mla_max_lane_values) + ")");
  const int warps = mla_decode_threads / 32;
  const std::size_t shared = static_cast<std::size_t>(width + a.nope + a.rope + 2 * warps + warps * a.kv_lora) * sizeof(float);
  if (shared > 48 * 1024) throw std::invalid_argument("mla_attention: kv_lora_rank " + std::to_string(a.kv_lora) + " too large");
  const dim3 grid(static_cast<unsigned>(a.rows), static_cast<unsigned>(a.heads));
  if (a.kv_b_type == dtype::bf16)
    launch(mla_decode_kernel<__nv_bfloat16>, grid, mla_decode_threads, shared, s, a);
  else
    launch(mla_decode_kernel<float>, grid, mla_decode_threads, shared, s, a);
}

void mla_prefill_gather(const paged_args& c, std::int32_t seq, std::int64_t keys, std::int64_t kv_lora, float* lat,
                        cudaStream_t s) {
  if (keys == 0) return;
  launch(mla_prefill_gather_kernel, static_cast<unsigned>(keys), threads, 0, s, c, seq, kv_lora, lat);
}

void mla_prefill_keys(const paged_args& c, std::int32_t seq, const float* kvd, const mla_prefill_shape& p,
                      std::int64_t kv_lora, std::uint16_t* k, std::uint16_t* vt, cudaStream_t s) {
  if (p.keys == 0) return;
  launch(mla_prefill_keys_kernel, dim3(static_cast<unsigned>(p.keys_pad), static_cast<unsigned>(p.heads)), 128, 0, s, c, seq,
         kvd, p, kv_lora, reinterpret_cast<__nv_bfloat16*>(k), reinterpret_cast<__nv_bfloat16*>(vt));
}

void mla_prefill_queries(const float* q, const std::int64_t* positions, const std::int32_t* row_ids,
                         const mla_prefill_shape& p, const float* inv_freq, float factor, std::uint16_t* q_out,
                         cudaStream_t s) {
  if (p.rows == 0) return;
  launch(mla_prefill_queries_kernel, dim3(static_cast<unsigned>(p.rows_pad), static_cast<unsigned>(p.heads)), 128, 0, s, q,
         positions, row_ids, p, inv_freq, factor, reinterpret_cast<__nv_bfloat16*>(q_out));
}

void router_topk(const float* logits, const float* bias, std::int64_t rows, std::int64_t experts, int k, float scaling,
                 std::int32_t* idx, float* weights, cudaStream_t s) {
  if (rows == 0) return;
  if (experts > 32 * router_max_per_lane)
    throw std::invalid_argument("router_topk: " + std::to_string(experts) + " experts (at most " +
                                std::to_string(32 * router_max_per_lane) + ")");
  constexpr int rows_per_block = 4;  // a warp each
  launch(router_topk_kernel, static_cast<unsigned>((rows + rows_per_block - 1) / rows_per_block), rows_per_block * 32, 0, s,
         logits, bias, rows, experts, k, scaling, idx, weights);
}

}  // namespace troupe::cuda
