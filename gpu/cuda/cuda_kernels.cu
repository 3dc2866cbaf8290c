#include "gpu/cuda/cuda_kernels.hpp"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>
#include <stdexcept>

#include "gpu/cuda/cuda_check.hpp"

namespace troupe::cuda {
namespace {

constexpr int threads = 256;

unsigned blocks_for(std::int64_t n) { return static_cast<unsigned>((n + threads - 1) / threads); }

// Sum (or max) over the block; every thread gets the result. `shared` holds 32 floats.
template <bool Max>
__device__ float block_reduce(float v, float* shared) {
  for (int o = 16; o > 0; o >>= 1) {
    const float other = __shfl_xor_sync(0xffffffffu, v, o);
    v = Max ? fmaxf(v, other) : v + other;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // `shared` may still be read from the previous reduction
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  const int warps = (blockDim.x + 31) >> 5;
  v = lane < warps ? shared[lane] : (Max ? -FLT_MAX : 0.0f);
  for (int o = 16; o > 0; o >>= 1) {
    const float other = __shfl_xor_sync(0xffffffffu, v, o);
    v = Max ? fmaxf(v, other) : v + other;
  }
  return v;
}

__device__ float load(dtype type, const void* p, std::int64_t i) {
  switch (type) {
    case dtype::bf16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    case dtype::f16: return __half2float(static_cast<const __half*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

__global__ void f32_to_bf16_kernel(const float* src, __nv_bfloat16* dst, std::int64_t n) {
  const std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
  if (i < n) dst[i] = __float2bfloat16_rn(src[i]);
}

__global__ void to_f32_kernel(dtype from, const void* src, float* dst, std::int64_t n) {
  const std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
  if (i < n) dst[i] = load(from, src, i);
}

__global__ void rms_norm_kernel(const float* x, std::int64_t x_stride, const float* w, float* y, std::int64_t y_stride,
                                std::int64_t cols, float eps, float post_scale) {
  __shared__ float shared[32];
  const float* xr = x + blockIdx.x * x_stride;
  float* yr = y + blockIdx.x * y_stride;
  float ss = 0.0f;
  for (std::int64_t c = threadIdx.x; c < cols; c += blockDim.x) ss += xr[c] * xr[c];
  const float inv = rsqrtf(block_reduce<false>(ss, shared) / static_cast<float>(cols) + eps);
  for (std::int64_t c = threadIdx.x; c < cols; c += blockDim.x) yr[c] = w[c] * (xr[c] * inv) * post_scale;
}

__global__ void layer_norm_kernel(const float* x, float* y, std::int64_t cols, float eps) {
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
  const std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
  if (i < n) y[i] *= factor;
}

__global__ void add_kernel(float* y, const float* x, std::int64_t n) {
  const std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
  if (i < n) y[i] += x[i];
}

__global__ void swiglu_kernel(const float* gate_up, float* out, std::int64_t rows, std::int64_t f) {
  const std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
  if (i >= rows * f) return;
  const std::int64_t r = i / f, c = i % f;
  const float g = gate_up[r * 2 * f + c];
  out[i] = g / (1.0f + expf(-g)) * gate_up[r * 2 * f + f + c];
}

__global__ void gather_rows_kernel(dtype type, const void* table, std::int64_t cols, const std::int64_t* ids, float* out,
                                   std::int64_t n) {
  const std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n * cols) return;
  const std::int64_t r = i / cols, c = i % cols;
  out[i] = load(type, table, ids[r] * cols + c);
}

__global__ void scatter_add_rows_kernel(const float* x, const std::int32_t* rows, const float* weights, float* out,
                                        std::int64_t n, std::int64_t cols) {
  const std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n * cols) return;
  const std::int64_t r = i / cols, c = i % cols;
  out[static_cast<std::int64_t>(rows[r]) * cols + c] += weights[r] * x[i];
}

__global__ void rope_kernel(float* x, std::int64_t rows, std::int64_t num_heads, std::int64_t head_stride,
                            std::int64_t offset, const std::int64_t* positions, const float* inv_freq, std::int64_t half,
                            float attention_factor) {
  const std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
  if (i >= rows * num_heads * half) return;
  const std::int64_t pair = i % half, h = (i / half) % num_heads, r = i / (half * num_heads);
  // The angle in float32 as the CPU computes it, then cos and sin at full precision.
  const float angle = static_cast<float>(positions[r]) * inv_freq[pair];
  const float c = cosf(angle) * attention_factor, s = sinf(angle) * attention_factor;
  float* p = x + r * num_heads * head_stride + h * head_stride + offset + 2 * pair;
  const float a = p[0], b = p[1];
  p[0] = a * c - b * s;
  p[1] = b * c + a * s;
}

// dot(w_row[0:k] (bf16), x[0:k]) for each of m rows of x (k apart), by one warp: lanes stride
// over K eight bf16 at a time (16-byte loads when K is a multiple of 8); lane 0 gets the sums.
__device__ void warp_dot_bf16(const __nv_bfloat16* row, const float* x, std::int64_t m, std::int64_t k,
                              float (&acc)[gemv_max_rows]) {
  const int lane = threadIdx.x & 31;
  if (k % 8 == 0) {
    for (std::int64_t c = lane * 8; c < k; c += 32 * 8) {
      const uint4 packed = *reinterpret_cast<const uint4*>(row + c);
      const __nv_bfloat162* pairs = reinterpret_cast<const __nv_bfloat162*>(&packed);
      float wf[8];
      for (int i = 0; i < 4; ++i) {
        const float2 f = __bfloat1622float2(pairs[i]);
        wf[2 * i] = f.x;
        wf[2 * i + 1] = f.y;
      }
      for (std::int64_t r = 0; r < m; ++r) {
        const float* xr = x + r * k + c;
        float sum = 0.0f;
        for (int i = 0; i < 8; ++i) sum += wf[i] * xr[i];
        acc[r] += sum;
      }
    }
  } else {
    for (std::int64_t c = lane; c < k; c += 32) {
      const float wf = __bfloat162float(row[c]);
      for (std::int64_t r = 0; r < m; ++r) acc[r] += wf * x[r * k + c];
    }
  }
  for (std::int64_t r = 0; r < m; ++r)
    for (int o = 16; o > 0; o >>= 1) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], o);
}

// One warp per output column, for every row of x at once.
__global__ void gemv_bf16_kernel(const float* x, std::int64_t m, std::int64_t k, const __nv_bfloat16* w, std::int64_t n,
                                 float* y, bool accumulate) {
  const std::int64_t col = blockIdx.x * static_cast<std::int64_t>(blockDim.x / 32) + (threadIdx.x >> 5);
  if (col >= n) return;
  float acc[gemv_max_rows] = {};
  warp_dot_bf16(w + col * k, x, m, k, acc);
  if ((threadIdx.x & 31) != 0) return;
  for (std::int64_t r = 0; r < m; ++r) y[r * n + col] = accumulate ? y[r * n + col] + acc[r] : acc[r];
}

// One warp per (output column, slot): the slot's expert matrix row against its input row.
__global__ void expert_gemv_kernel(const float* x, std::int64_t x_row_div, const std::int32_t* idx,
                                   const __nv_bfloat16* const* weights, std::int32_t n_routed, std::int64_t n, std::int64_t k,
                                   float* y) {
  const std::int64_t col = blockIdx.x * static_cast<std::int64_t>(blockDim.x / 32) + (threadIdx.x >> 5);
  const std::int64_t slot = blockIdx.y;
  const std::int32_t e = idx[slot];
  if (col >= n || e >= n_routed) return;
  float acc[gemv_max_rows] = {};
  warp_dot_bf16(weights[e] + col * k, x + (slot / x_row_div) * k, 1, k, acc);
  if ((threadIdx.x & 31) == 0) y[slot * n + col] = acc[0];
}

__global__ void moe_combine_kernel(const float* u, const float* y, const std::int32_t* idx, const float* gates,
                                   std::int64_t rows, int k, std::int32_t n_routed, std::int64_t h, float* out) {
  const std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
  if (i >= rows * h) return;
  const std::int64_t t = i / h, c = i % h;
  float sum = 0.0f;
  for (int j = 0; j < k; ++j) {
    const std::int64_t slot = t * k + j;
    sum += gates[slot] * (idx[slot] < n_routed ? y[slot * h + c] : u[i]);
  }
  out[i] = sum;
}

// One (row, head) per block: q_lat = q_nope . W_k, scores over the visible latent rows,
// softmax, attended latent, expansion through W_v. Shared memory: q_lat and the attended
// latent (kv_lora each), q_rope.
__global__ void mla_segment_kernel(mla_segment_args a) {
  extern __shared__ float smem[];
  __shared__ float shared[32];
  float* q_lat = smem;
  float* out_lat = smem + a.kv_lora;
  float* q_rope = smem + 2 * a.kv_lora;
  const std::int64_t r = blockIdx.x, h = blockIdx.y;
  const std::int64_t width = a.kv_lora + a.rope;
  const float* q = a.q + (a.row_begin + r) * a.q_stride + h * (a.nope + a.rope);
  const float* w_k = a.kv_b + h * (a.nope + a.v) * a.kv_lora;  // [nope, kv_lora]
  const float* w_v = w_k + a.nope * a.kv_lora;                 // [v, kv_lora]
  for (std::int64_t c = threadIdx.x; c < a.kv_lora; c += blockDim.x) {
    float acc = 0.0f;
    for (std::int64_t n = 0; n < a.nope; ++n) acc += q[n] * w_k[n * a.kv_lora + c];
    q_lat[c] = acc;
  }
  for (std::int64_t c = threadIdx.x; c < a.rope; c += blockDim.x) q_rope[c] = q[a.nope + c];
  __syncthreads();
  const std::int64_t visible = a.first_position + r + 1;  // causal
  const std::int64_t keys = a.first_position + a.rows;
  float* scores = a.scores + (r * a.heads + h) * keys;
  float mx = -FLT_MAX;
  for (std::int64_t j = threadIdx.x; j < visible; j += blockDim.x) {
    const float* lat = a.blocks[j / a.block_tokens] + (j % a.block_tokens) * width;
    float s = 0.0f;
    for (std::int64_t c = 0; c < a.kv_lora; ++c) s += q_lat[c] * lat[c];
    for (std::int64_t c = 0; c < a.rope; ++c) s += q_rope[c] * lat[a.kv_lora + c];
    s *= a.softmax_scale;
    scores[j] = s;
    mx = fmaxf(mx, s);
  }
  mx = block_reduce<true>(mx, shared);
  float sum = 0.0f;
  for (std::int64_t j = threadIdx.x; j < visible; j += blockDim.x) sum += (scores[j] = expf(scores[j] - mx));
  const float inv = 1.0f / block_reduce<false>(sum, shared);
  __syncthreads();  // every score written before any thread reads them all
  for (std::int64_t c = threadIdx.x; c < a.kv_lora; c += blockDim.x) {
    float acc = 0.0f;
    for (std::int64_t j = 0; j < visible; ++j) acc += scores[j] * a.blocks[j / a.block_tokens][(j % a.block_tokens) * width + c];
    out_lat[c] = acc * inv;
  }
  __syncthreads();
  float* out = a.out + (a.row_begin + r) * a.out_stride + h * a.v;
  for (std::int64_t c = threadIdx.x; c < a.v; c += blockDim.x) {
    float acc = 0.0f;
    for (std::int64_t l = 0; l < a.kv_lora; ++l) acc += out_lat[l] * w_v[c * a.kv_lora + l];
    out[c] = acc;
  }
}

// One row per thread: softmax, then k passes picking the best biased score not yet taken.
__global__ void router_topk_kernel(const float* logits, const float* bias, std::int64_t rows, std::int64_t experts, int k,
                                   float scaling, std::int32_t* idx, float* weights) {
  const std::int64_t r = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
  if (r >= rows) return;
  const float* l = logits + r * experts;
  float mx = -FLT_MAX;
  for (std::int64_t e = 0; e < experts; ++e) mx = fmaxf(mx, l[e]);
  float sum = 0.0f;
  for (std::int64_t e = 0; e < experts; ++e) sum += expf(l[e] - mx);
  std::int32_t* out_idx = idx + r * k;
  for (int j = 0; j < k; ++j) {
    std::int32_t best = -1;
    float best_choice = 0.0f;
    for (std::int64_t e = 0; e < experts; ++e) {
      bool taken = false;
      for (int t = 0; t < j; ++t) taken |= out_idx[t] == e;
      if (taken) continue;
      const float choice = expf(l[e] - mx) / sum + bias[e];
      if (best < 0 || choice > best_choice) best = static_cast<std::int32_t>(e), best_choice = choice;
    }
    out_idx[j] = best;
    weights[r * k + j] = expf(l[best] - mx) / sum * scaling;
  }
}

}  // namespace

void f32_to_bf16(const float* src, std::uint16_t* dst, std::int64_t n, cudaStream_t s) {
  if (n == 0) return;
  f32_to_bf16_kernel<<<blocks_for(n), threads, 0, s>>>(src, reinterpret_cast<__nv_bfloat16*>(dst), n);
  TROUPE_CUDA_CHECK_LAUNCH();
}

void to_f32(dtype from, const void* src, float* dst, std::int64_t n, cudaStream_t s) {
  if (n == 0) return;
  to_f32_kernel<<<blocks_for(n), threads, 0, s>>>(from, src, dst, n);
  TROUPE_CUDA_CHECK_LAUNCH();
}

void gemv_bf16(const float* x, std::int64_t m, std::int64_t k, const std::uint16_t* w, std::int64_t n, float* y,
               bool accumulate, cudaStream_t s) {
  if (m == 0 || n == 0) return;
  if (m > gemv_max_rows) throw std::logic_error("gemv_bf16: more rows than gemv_max_rows");
  const unsigned warps = threads / 32;
  gemv_bf16_kernel<<<static_cast<unsigned>((n + warps - 1) / warps), threads, 0, s>>>(
      x, m, k, reinterpret_cast<const __nv_bfloat16*>(w), n, y, accumulate);
  TROUPE_CUDA_CHECK_LAUNCH();
}

void expert_gemv_bf16(const float* x, std::int64_t x_row_div, const std::int32_t* idx, std::int64_t slots,
                      const std::uint16_t* const* weights, std::int32_t n_routed, std::int64_t n, std::int64_t k, float* y,
                      cudaStream_t s) {
  if (slots == 0 || n == 0) return;
  const unsigned warps = threads / 32;
  const dim3 grid(static_cast<unsigned>((n + warps - 1) / warps), static_cast<unsigned>(slots));
  expert_gemv_kernel<<<grid, threads, 0, s>>>(x, x_row_div, idx, reinterpret_cast<const __nv_bfloat16* const*>(weights),
                                              n_routed, n, k, y);
  TROUPE_CUDA_CHECK_LAUNCH();
}

void moe_combine(const float* u, const float* y, const std::int32_t* idx, const float* gates, std::int64_t rows, int k,
                 std::int32_t n_routed, std::int64_t h, float* out, cudaStream_t s) {
  if (rows * h == 0) return;
  moe_combine_kernel<<<blocks_for(rows * h), threads, 0, s>>>(u, y, idx, gates, rows, k, n_routed, h, out);
  TROUPE_CUDA_CHECK_LAUNCH();
}

void rms_norm(const float* x, std::int64_t x_stride, const float* w, float* y, std::int64_t y_stride, std::int64_t rows,
              std::int64_t cols, float eps, float post_scale, cudaStream_t s) {
  if (rows == 0) return;
  rms_norm_kernel<<<static_cast<unsigned>(rows), threads, 0, s>>>(x, x_stride, w, y, y_stride, cols, eps, post_scale);
  TROUPE_CUDA_CHECK_LAUNCH();
}

void layer_norm(const float* x, float* y, std::int64_t rows, std::int64_t cols, float eps, cudaStream_t s) {
  if (rows == 0) return;
  layer_norm_kernel<<<static_cast<unsigned>(rows), threads, 0, s>>>(x, y, cols, eps);
  TROUPE_CUDA_CHECK_LAUNCH();
}

void scale(float* y, std::int64_t n, float factor, cudaStream_t s) {
  if (n == 0) return;
  scale_kernel<<<blocks_for(n), threads, 0, s>>>(y, n, factor);
  TROUPE_CUDA_CHECK_LAUNCH();
}

void add(float* y, const float* x, std::int64_t n, cudaStream_t s) {
  if (n == 0) return;
  add_kernel<<<blocks_for(n), threads, 0, s>>>(y, x, n);
  TROUPE_CUDA_CHECK_LAUNCH();
}

void swiglu(const float* gate_up, float* out, std::int64_t rows, std::int64_t f, cudaStream_t s) {
  if (rows * f == 0) return;
  swiglu_kernel<<<blocks_for(rows * f), threads, 0, s>>>(gate_up, out, rows, f);
  TROUPE_CUDA_CHECK_LAUNCH();
}

void gather_rows(dtype type, const void* table, std::int64_t cols, const std::int64_t* ids, float* out, std::int64_t n,
                 cudaStream_t s) {
  if (n * cols == 0) return;
  gather_rows_kernel<<<blocks_for(n * cols), threads, 0, s>>>(type, table, cols, ids, out, n);
  TROUPE_CUDA_CHECK_LAUNCH();
}

void scatter_add_rows(const float* x, const std::int32_t* rows, const float* weights, float* out, std::int64_t n,
                      std::int64_t cols, cudaStream_t s) {
  if (n * cols == 0) return;
  scatter_add_rows_kernel<<<blocks_for(n * cols), threads, 0, s>>>(x, rows, weights, out, n, cols);
  TROUPE_CUDA_CHECK_LAUNCH();
}

void rope_interleaved(float* x, std::int64_t rows, std::int64_t num_heads, std::int64_t head_stride, std::int64_t offset,
                      const std::int64_t* positions, const float* inv_freq, std::int64_t half, float attention_factor,
                      cudaStream_t s) {
  const std::int64_t n = rows * num_heads * half;
  if (n == 0) return;
  rope_kernel<<<blocks_for(n), threads, 0, s>>>(x, rows, num_heads, head_stride, offset, positions, inv_freq, half,
                                                 attention_factor);
  TROUPE_CUDA_CHECK_LAUNCH();
}

void mla_attention_segment(const mla_segment_args& a, cudaStream_t s) {
  if (a.rows == 0) return;
  const dim3 grid(static_cast<unsigned>(a.rows), static_cast<unsigned>(a.heads));
  const std::size_t shared = static_cast<std::size_t>(2 * a.kv_lora + a.rope) * sizeof(float);
  mla_segment_kernel<<<grid, threads, shared, s>>>(a);
  TROUPE_CUDA_CHECK_LAUNCH();
}

void router_topk(const float* logits, const float* bias, std::int64_t rows, std::int64_t experts, int k, float scaling,
                 std::int32_t* idx, float* weights, cudaStream_t s) {
  if (rows == 0) return;
  router_topk_kernel<<<blocks_for(rows), threads, 0, s>>>(logits, bias, rows, experts, k, scaling, idx, weights);
  TROUPE_CUDA_CHECK_LAUNCH();
}

}  // namespace troupe::cuda
