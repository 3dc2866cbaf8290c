#include "training/cuda/train_kernels.hpp"

#include <cfloat>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "gpu/cuda/block_reduce.cuh"
#include "gpu/cuda/cuda_check.hpp"

namespace troupe::train::cuda {
namespace {

using troupe::cuda::block_reduce;

constexpr int threads = 256;
// Rows a norm backward block walks, summing its share of dw before one atomic add per column.
constexpr int norm_rows_per_block = 8;

// Element-wise kernels index in 32 bits (a 64-bit division costs tens of instructions): their
// launchers refuse arrays of 2^31 elements or more.
using idx_t = std::uint32_t;
idx_t checked(std::int64_t n) {
  if (n < 0 || n >= (std::int64_t(1) << 31))
    throw std::length_error("train kernel: " + std::to_string(n) + " elements exceed 32-bit indexing");
  return static_cast<idx_t>(n);
}
__device__ __forceinline__ idx_t thread_index() { return blockIdx.x * blockDim.x + threadIdx.x; }

unsigned blocks_for(std::int64_t n) { return static_cast<unsigned>((n + threads - 1) / threads); }
unsigned grid_of(std::int64_t n) { return static_cast<unsigned>(n); }

__device__ float sigmoidf(float x) { return 1.0f / (1.0f + __expf(-x)); }

__global__ void rms_norm_forward_kernel(const float* x, const float* w, std::int64_t cols, std::int64_t stride, float eps,
                                        float post_scale, float* y, float* rms_inv) {
  __shared__ float shared[32];
  const std::int64_t r = blockIdx.x;
  const float* xr = x + r * stride;
  float ss = 0;
  for (std::int64_t c = threadIdx.x; c < cols; c += blockDim.x) ss += xr[c] * xr[c];
  const float inv = rsqrtf(block_reduce<false>(ss, shared) / static_cast<float>(cols) + eps);
  if (threadIdx.x == 0) rms_inv[r] = inv;
  float* yr = y + r * stride;
  for (std::int64_t c = threadIdx.x; c < cols; c += blockDim.x) yr[c] = xr[c] * inv * w[c] * post_scale;
}

// dw partial sums live in dynamic shared memory (cols floats), one atomic add per column a block.
__global__ void rms_norm_backward_kernel(const float* dy, const float* x, const float* w, const float* rms_inv,
                                         std::int64_t rows, std::int64_t cols, std::int64_t stride, float post_scale,
                                         float* dx, float* dw) {
  extern __shared__ float dw_part[];
  __shared__ float shared[32];
  for (std::int64_t c = threadIdx.x; c < cols; c += blockDim.x) dw_part[c] = 0;
  const std::int64_t r0 = static_cast<std::int64_t>(blockIdx.x) * norm_rows_per_block;
  const std::int64_t r1 = r0 + norm_rows_per_block < rows ? r0 + norm_rows_per_block : rows;
  for (std::int64_t r = r0; r < r1; ++r) {
    const float* xr = x + r * stride;
    const float* gr = dy + r * stride;
    const float inv = rms_inv[r];
    float dot = 0;
    for (std::int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
      dot += gr[c] * w[c] * post_scale * xr[c];
      dw_part[c] += gr[c] * xr[c] * inv * post_scale;  // each thread owns its columns
    }
    const float coef = inv * inv * inv * block_reduce<false>(dot, shared) / static_cast<float>(cols);
    float* dxr = dx + r * stride;
    for (std::int64_t c = threadIdx.x; c < cols; c += blockDim.x) dxr[c] += inv * gr[c] * w[c] * post_scale - xr[c] * coef;
  }
  for (std::int64_t c = threadIdx.x; c < cols; c += blockDim.x) atomicAdd(dw + c, dw_part[c]);
}

__global__ void layer_norm_forward_kernel(const float* x, std::int64_t cols, float eps, float* y, float* std_inv) {
  __shared__ float shared[32];
  const std::int64_t r = blockIdx.x;
  const float* xr = x + r * cols;
  float sum = 0;
  for (std::int64_t c = threadIdx.x; c < cols; c += blockDim.x) sum += xr[c];
  const float mean = block_reduce<false>(sum, shared) / static_cast<float>(cols);
  float var = 0;
  for (std::int64_t c = threadIdx.x; c < cols; c += blockDim.x) var += (xr[c] - mean) * (xr[c] - mean);
  const float inv = rsqrtf(block_reduce<false>(var, shared) / static_cast<float>(cols) + eps);
  if (threadIdx.x == 0) std_inv[r] = inv;
  for (std::int64_t c = threadIdx.x; c < cols; c += blockDim.x) y[r * cols + c] = (xr[c] - mean) * inv;
}

__global__ void layer_norm_backward_kernel(const float* dy, const float* y, const float* std_inv, std::int64_t cols,
                                           float* dx) {
  __shared__ float shared[32];
  const std::int64_t r = blockIdx.x;
  const float* g = dy + r * cols;
  const float* yr = y + r * cols;
  float sg = 0, sgy = 0;
  for (std::int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    sg += g[c];
    sgy += g[c] * yr[c];
  }
  const float mean_g = block_reduce<false>(sg, shared) / static_cast<float>(cols);
  const float mean_gy = block_reduce<false>(sgy, shared) / static_cast<float>(cols);
  const float inv = std_inv[r];
  for (std::int64_t c = threadIdx.x; c < cols; c += blockDim.x) dx[r * cols + c] += inv * (g[c] - mean_g - yr[c] * mean_gy);
}

__global__ void rope_kernel(float* x, const float* cos, const float* sin, idx_t n, idx_t heads, idx_t stride, idx_t offset,
                            idx_t half, float sign) {
  const idx_t i = thread_index();
  if (i >= n) return;
  const idx_t p = i % half, h = (i / half) % heads, r = i / (half * heads);
  float* q = x + r * heads * stride + h * stride + offset + 2 * p;
  const float c = cos[r * half + p], s = sin[r * half + p], a = q[0], b = q[1];
  q[0] = a * c - sign * b * s;
  q[1] = b * c + sign * a * s;
}

__global__ void swiglu_forward_kernel(const float* gate, const float* up, float* out, std::int64_t n) {
  const std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = gate[i] * sigmoidf(gate[i]) * up[i];
}

__global__ void swiglu_backward_kernel(const float* dout, const float* gate, const float* up, float* dgate, float* dup,
                                       std::int64_t n) {
  const std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float s = sigmoidf(gate[i]);
  dgate[i] = dout[i] * up[i] * s * (1.0f + gate[i] * (1.0f - s));
  dup[i] = dout[i] * gate[i] * s;
}

__global__ void add_kernel(float* y, const float* x, std::int64_t n) {
  const std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) y[i] += x[i];
}

__global__ void scale_kernel(float* y, float a, std::int64_t n) {
  const std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) y[i] *= a;
}

__global__ void copy_columns_kernel(const float* src, idx_t src_stride, float* dst, idx_t dst_stride, idx_t n, idx_t cols) {
  const idx_t i = thread_index();
  if (i >= n) return;
  const idx_t r = i / cols, c = i % cols;
  dst[r * dst_stride + c] = src[r * src_stride + c];
}

__global__ void assemble_keys_kernel(const float* kvb, const float* k_lat, idx_t n, idx_t heads, idx_t nope, idx_t rope,
                                     idx_t v_dim, idx_t kv_lora, float* key) {
  const idx_t qk = nope + rope;
  const idx_t i = thread_index();
  if (i >= n) return;
  const idx_t d = i % qk, h = (i / qk) % heads, r = i / (qk * heads);
  key[i] = d < nope ? kvb[(r * heads + h) * (nope + v_dim) + d] : k_lat[r * (kv_lora + rope) + kv_lora + d - nope];
}

// One thread per (row, column of the head block): the nope part per head, the rope part summed over heads.
__global__ void split_key_grad_kernel(const float* dkey, idx_t n, idx_t heads, idx_t nope, idx_t rope, idx_t v_dim,
                                      idx_t kv_lora, float* dkvb, float* dk_lat) {
  const idx_t qk = nope + rope;
  const idx_t i = thread_index();
  if (i >= n) return;
  const idx_t d = i % qk, r = i / qk;
  if (d < nope) {
    for (idx_t h = 0; h < heads; ++h) dkvb[(r * heads + h) * (nope + v_dim) + d] += dkey[(r * heads + h) * qk + d];
  } else {
    float sum = 0;
    for (idx_t h = 0; h < heads; ++h) sum += dkey[(r * heads + h) * qk + d];
    dk_lat[r * (kv_lora + rope) + kv_lora + d - nope] = sum;
  }
}

// A block per (head, row i) of one sequence's [heads, n, n] scores.
__global__ void causal_softmax_kernel(float* scores, std::int64_t n, float scale, float* lse) {
  __shared__ float shared[32];
  const std::int64_t row = blockIdx.x, i = row % n;
  float* p = scores + row * n;
  float mx = -FLT_MAX;
  for (std::int64_t j = threadIdx.x; j <= i; j += blockDim.x) mx = fmaxf(mx, p[j] * scale);
  mx = block_reduce<true>(mx, shared);
  float sum = 0;
  for (std::int64_t j = threadIdx.x; j <= i; j += blockDim.x) sum += __expf(p[j] * scale - mx);
  sum = block_reduce<false>(sum, shared);
  const float inv = 1.0f / sum;
  for (std::int64_t j = threadIdx.x; j < n; j += blockDim.x) p[j] = j <= i ? __expf(p[j] * scale - mx) * inv : 0.0f;
  if (threadIdx.x == 0) lse[row] = mx + logf(sum);
}

__global__ void causal_softmax_recompute_kernel(float* scores, const float* lse, std::int64_t n, float scale) {
  const std::int64_t row = blockIdx.x, i = row % n;
  float* p = scores + row * n;
  const float l = lse[row];
  for (std::int64_t j = threadIdx.x; j < n; j += blockDim.x) p[j] = j <= i ? __expf(p[j] * scale - l) : 0.0f;
}

__global__ void softmax_grad_kernel(const float* probs, float* dp, const float* delta, std::int64_t row0,
                                    std::int64_t heads, std::int64_t n, float scale) {
  const std::int64_t row = blockIdx.x, h = row / n, i = row % n;
  const float d = delta[(row0 + i) * heads + h];
  const float* p = probs + row * n;
  float* g = dp + row * n;
  for (std::int64_t j = threadIdx.x; j < n; j += blockDim.x) g[j] = j <= i ? p[j] * (g[j] - d) * scale : 0.0f;
}

// A warp per (row, head).
__global__ void head_dots_kernel(const float* a, const float* b, std::int64_t pairs, std::int64_t dim, float* delta) {
  const std::int64_t pair = (static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  if (pair >= pairs) return;
  float sum = 0;
  for (std::int64_t d = lane; d < dim; d += 32) sum += a[pair * dim + d] * b[pair * dim + d];
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  if (lane == 0) delta[pair] = sum;
}

// A thread per row: the router's experts are few (tens).
__global__ void router_forward_kernel(float* probs, const float* bias, std::int64_t rows, std::int64_t experts, int k,
                                      float scaling, std::int32_t* idx, float* gates) {
  const std::int64_t r = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  float* p = probs + r * experts;
  float mx = -FLT_MAX;
  for (std::int64_t e = 0; e < experts; ++e) mx = fmaxf(mx, p[e]);
  float sum = 0;
  for (std::int64_t e = 0; e < experts; ++e) sum += (p[e] = expf(p[e] - mx));
  for (std::int64_t e = 0; e < experts; ++e) p[e] /= sum;
  for (int j = 0; j < k; ++j) {  // selection: the highest score not yet taken, lower id on ties
    std::int32_t best = -1;
    float best_score = -FLT_MAX;
    for (std::int64_t e = 0; e < experts; ++e) {
      bool taken = false;
      for (int t = 0; t < j; ++t) taken |= idx[r * k + t] == e;
      const float score = p[e] + bias[e];
      if (!taken && (best < 0 || score > best_score)) {
        best = static_cast<std::int32_t>(e);
        best_score = score;
      }
    }
    idx[r * k + j] = best;
    gates[r * k + j] = p[best] * scaling;
  }
}

__global__ void softmax_backward_kernel(const float* probs, const float* dprobs, std::int64_t rows, std::int64_t cols,
                                        float* dlogits) {
  const std::int64_t r = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  const float* p = probs + r * cols;
  const float* dp = dprobs + r * cols;
  float dot = 0;
  for (std::int64_t j = 0; j < cols; ++j) dot += p[j] * dp[j];
  for (std::int64_t j = 0; j < cols; ++j) dlogits[r * cols + j] = p[j] * (dp[j] - dot);
}

__global__ void gather_kernel(const float* src, const std::int32_t* rows, idx_t n, idx_t h, float* out) {
  const idx_t i = thread_index();
  if (i < n) out[i] = src[static_cast<std::int64_t>(rows[i / h]) * h + i % h];
}

__global__ void combine_expert_kernel(const float* y, const std::int32_t* rows, const std::int32_t* slots,
                                      const float* gates, int k, idx_t n, idx_t h, float* out) {
  const idx_t i = thread_index();
  if (i >= n) return;
  const std::int64_t row = rows[i / h];
  out[row * h + i % h] += gates[row * k + slots[i / h]] * y[i];
}

__global__ void combine_zero_experts_kernel(const float* u, const std::int32_t* idx, const float* gates, idx_t n, int k,
                                            std::int32_t n_routed, idx_t h, float* out) {
  const idx_t i = thread_index();
  if (i >= n) return;
  const idx_t r = i / h;
  float g = 0;
  for (int j = 0; j < k; ++j)
    if (idx[r * k + j] >= n_routed) g += gates[r * k + j];
  out[i] = g * u[i];
}

// A block per routed row of the expert.
__global__ void expert_grad_kernel(const float* dy, const float* y, const std::int32_t* rows, const std::int32_t* slots,
                                   const float* gates, int k, std::int64_t h, std::int32_t expert, std::int64_t experts,
                                   float scaling, float* dprobs, float* dexpert) {
  __shared__ float shared[32];
  const std::int64_t i = blockIdx.x, r = rows[i];
  const float g = gates[r * k + slots[i]];
  float dot = 0;
  for (std::int64_t c = threadIdx.x; c < h; c += blockDim.x) {
    dot += dy[r * h + c] * y[i * h + c];
    dexpert[i * h + c] = g * dy[r * h + c];
  }
  dot = block_reduce<false>(dot, shared);
  if (threadIdx.x == 0) dprobs[r * experts + expert] = dot * scaling;
}

// A block per row: the zero slots' gradients.
__global__ void zero_experts_grad_kernel(const float* dy, const float* u, const std::int32_t* idx, const float* gates,
                                         int k, std::int32_t n_routed, std::int64_t experts, std::int64_t h,
                                         float scaling, float* dprobs, float* du) {
  __shared__ float shared[32];
  const std::int64_t r = blockIdx.x;
  float g = 0;
  bool any = false;
  for (int j = 0; j < k; ++j)
    if (idx[r * k + j] >= n_routed) {
      g += gates[r * k + j];
      any = true;
    }
  if (!any) return;  // uniform over the block: every thread returns
  float dot = 0;
  for (std::int64_t c = threadIdx.x; c < h; c += blockDim.x) {
    dot += dy[r * h + c] * u[r * h + c];
    du[r * h + c] += g * dy[r * h + c];
  }
  dot = block_reduce<false>(dot, shared);
  if (threadIdx.x == 0)
    for (int j = 0; j < k; ++j)
      if (idx[r * k + j] >= n_routed) dprobs[r * experts + idx[r * k + j]] = dot * scaling;
}

__global__ void gather_table_rows_kernel(const float* table, const std::int64_t* ids, idx_t id_stride, idx_t n, idx_t d,
                                         float* out) {
  const idx_t i = thread_index();
  if (i < n) out[i] = table[ids[(i / d) * id_stride] * d + i % d];
}

__global__ void scatter_add_table_rows_kernel(const float* src, const std::int64_t* ids, idx_t id_stride, idx_t n, idx_t d,
                                              float* grad, std::uint8_t* touched) {
  const idx_t i = thread_index();
  if (i >= n) return;
  const std::int64_t id = ids[(i / d) * id_stride];
  atomicAdd(grad + id * d + i % d, src[i]);
  if (touched && i % d == 0) touched[id] = 1;
}

__global__ void scatter_add_kernel(const float* src, const std::int32_t* rows, idx_t n, idx_t h, float* grad) {
  const idx_t i = thread_index();
  if (i < n) grad[static_cast<std::int64_t>(rows[i / h]) * h + i % h] += src[i];
}

__global__ void cross_entropy_kernel(float* logits, const std::int32_t* targets, std::int64_t vocab, float weight,
                                     float* loss) {
  __shared__ float shared[32];
  const std::int64_t r = blockIdx.x;
  float* l = logits + r * vocab;
  const std::int32_t target = targets[r];
  if (target < 0) {
    for (std::int64_t v = threadIdx.x; v < vocab; v += blockDim.x) l[v] = 0;
    if (threadIdx.x == 0) loss[r] = 0;
    return;
  }
  float mx = -FLT_MAX;
  for (std::int64_t v = threadIdx.x; v < vocab; v += blockDim.x) mx = fmaxf(mx, l[v]);
  mx = block_reduce<true>(mx, shared);
  float sum = 0;
  for (std::int64_t v = threadIdx.x; v < vocab; v += blockDim.x) sum += expf(l[v] - mx);
  sum = block_reduce<false>(sum, shared);
  const float target_logit = l[target];
  __syncthreads();  // every thread has read l[target] before it is overwritten
  if (threadIdx.x == 0) loss[r] = (mx + logf(sum) - target_logit) * weight;
  const float s = weight / sum;
  for (std::int64_t v = threadIdx.x; v < vocab; v += blockDim.x) l[v] = expf(l[v] - mx) * s - (v == target ? weight : 0.0f);
}

template <bool Square>
__global__ void add_sum_kernel(const float* x, std::int64_t n, double* sum) {
  __shared__ double part[threads];
  double acc = 0;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
    acc += Square ? static_cast<double>(x[i]) * x[i] : static_cast<double>(x[i]);
  part[threadIdx.x] = acc;
  __syncthreads();
  for (int o = threads / 2; o > 0; o >>= 1) {
    if (static_cast<int>(threadIdx.x) < o) part[threadIdx.x] += part[threadIdx.x + o];
    __syncthreads();
  }
  if (threadIdx.x == 0) atomicAdd(sum, part[0]);
}

__global__ void adamw_kernel(float* value, const float* grad, float* m, float* v, idx_t n, idx_t cols,
                             const std::uint8_t* touched, adamw_step st) {
  const idx_t i = thread_index();
  if (i >= n || (touched && !touched[i / cols])) return;
  const float g = grad[i] * st.grad_scale;
  const float mi = m[i] = st.beta1 * m[i] + (1.0f - st.beta1) * g;
  const float vi = v[i] = st.beta2 * v[i] + (1.0f - st.beta2) * g * g;
  const float update = (mi / st.bias1) / (sqrtf(vi / st.bias2) + st.eps);
  value[i] -= st.lr * update + st.decay * value[i];
}

}  // namespace

void rms_norm_forward(const float* x, const float* w, std::int64_t rows, std::int64_t cols, std::int64_t stride, float eps,
                      float post_scale, float* y, float* rms_inv, cudaStream_t s) {
  if (rows == 0) return;
  rms_norm_forward_kernel<<<grid_of(rows), threads, 0, s>>>(x, w, cols, stride, eps, post_scale, y, rms_inv);
  TROUPE_CUDA_CHECK_LAUNCH();
}

void rms_norm_backward(const float* dy, const float* x, const float* w, const float* rms_inv, std::int64_t rows,
                       std::int64_t cols, std::int64_t stride, float post_scale, float* dx, float* dw, cudaStream_t s) {
  if (rows == 0) return;
  const auto grid = static_cast<unsigned>((rows + norm_rows_per_block - 1) / norm_rows_per_block);
  rms_norm_backward_kernel<<<grid, threads, static_cast<std::size_t>(cols) * sizeof(float), s>>>(
      dy, x, w, rms_inv, rows, cols, stride, post_scale, dx, dw);
  TROUPE_CUDA_CHECK_LAUNCH();
}

void layer_norm_forward(const float* x, std::int64_t rows, std::int64_t cols, float eps, float* y, float* std_inv,
                        cudaStream_t s) {
  if (rows == 0) return;
  layer_norm_forward_kernel<<<grid_of(rows), threads, 0, s>>>(x, cols, eps, y, std_inv);
  TROUPE_CUDA_CHECK_LAUNCH();
}

void layer_norm_backward(const float* dy, const float* y, const float* std_inv, std::int64_t rows, std::int64_t cols,
                         float* dx, cudaStream_t s) {
  if (rows == 0) return;
  layer_norm_backward_kernel<<<grid_of(rows), threads, 0, s>>>(dy, y, std_inv, cols, dx);
  TROUPE_CUDA_CHECK_LAUNCH();
}

void rope(float* x, const float* cos, const float* sin, std::int64_t rows, std::int64_t heads, std::int64_t stride,
          std::int64_t offset, std::int64_t half, bool inverse, cudaStream_t s) {
  const std::int64_t n = rows * heads * half;
  if (n == 0) return;
  checked(rows * heads * stride);
  rope_kernel<<<blocks_for(n), threads, 0, s>>>(x, cos, sin, checked(n), checked(heads), checked(stride), checked(offset),
                                                checked(half), inverse ? -1.0f : 1.0f);
  TROUPE_CUDA_CHECK_LAUNCH();
}

void swiglu_forward(const float* gate, const float* up, float* out, std::int64_t n, cudaStream_t s) {
  if (n == 0) return;
  swiglu_forward_kernel<<<blocks_for(n), threads, 0, s>>>(gate, up, out, n);
  TROUPE_CUDA_CHECK_LAUNCH();
}

void swiglu_backward(const float* dout, const float* gate, const float* up, float* dgate, float* dup, std::int64_t n,
                     cudaStream_t s) {
  if (n == 0) return;
  swiglu_backward_kernel<<<blocks_for(n), threads, 0, s>>>(dout, gate, up, dgate, dup, n);
  TROUPE_CUDA_CHECK_LAUNCH();
}

void add(float* y, const float* x, std::int64_t n, cudaStream_t s) {
  if (n == 0) return;
  add_kernel<<<blocks_for(n), threads, 0, s>>>(y, x, n);
  TROUPE_CUDA_CHECK_LAUNCH();
}

void scale(float* y, float a, std::int64_t n, cudaStream_t s) {
  if (n == 0) return;
  scale_kernel<<<blocks_for(n), threads, 0, s>>>(y, a, n);
  TROUPE_CUDA_CHECK_LAUNCH();
}

void copy_columns(const float* src, std::int64_t src_stride, float* dst, std::int64_t dst_stride, std::int64_t rows,
                  std::int64_t cols, cudaStream_t s) {
  if (rows * cols == 0) return;
  checked(rows * std::max(src_stride, dst_stride));
  copy_columns_kernel<<<blocks_for(rows * cols), threads, 0, s>>>(src, checked(src_stride), dst, checked(dst_stride),
                                                                  checked(rows * cols), checked(cols));
  TROUPE_CUDA_CHECK_LAUNCH();
}

void assemble_keys(const float* kvb, const float* k_lat, std::int64_t rows, std::int64_t heads, std::int64_t nope,
                   std::int64_t rope, std::int64_t v_dim, std::int64_t kv_lora, float* key, cudaStream_t s) {
  const std::int64_t n = rows * heads * (nope + rope);
  if (n == 0) return;
  checked(rows * heads * (nope + v_dim));
  assemble_keys_kernel<<<blocks_for(n), threads, 0, s>>>(kvb, k_lat, checked(n), checked(heads), checked(nope), checked(rope),
                                                         checked(v_dim), checked(kv_lora), key);
  TROUPE_CUDA_CHECK_LAUNCH();
}

void split_key_grad(const float* dkey, std::int64_t rows, std::int64_t heads, std::int64_t nope, std::int64_t rope,
                    std::int64_t v_dim, std::int64_t kv_lora, float* dkvb, float* dk_lat, cudaStream_t s) {
  const std::int64_t n = rows * (nope + rope);
  if (n == 0) return;
  checked(rows * heads * (nope + v_dim));
  split_key_grad_kernel<<<blocks_for(n), threads, 0, s>>>(dkey, checked(n), checked(heads), checked(nope), checked(rope),
                                                          checked(v_dim), checked(kv_lora), dkvb, dk_lat);
  TROUPE_CUDA_CHECK_LAUNCH();
}

void causal_softmax(float* scores, std::int64_t heads, std::int64_t n, float scale, float* lse, cudaStream_t s) {
  if (heads * n == 0) return;
  causal_softmax_kernel<<<grid_of(heads * n), threads, 0, s>>>(scores, n, scale, lse);
  TROUPE_CUDA_CHECK_LAUNCH();
}

void causal_softmax_recompute(float* scores, const float* lse, std::int64_t heads, std::int64_t n, float scale,
                              cudaStream_t s) {
  if (heads * n == 0) return;
  causal_softmax_recompute_kernel<<<grid_of(heads * n), threads, 0, s>>>(scores, lse, n, scale);
  TROUPE_CUDA_CHECK_LAUNCH();
}

void softmax_grad(const float* probs, float* dp, const float* delta, std::int64_t row0, std::int64_t heads, std::int64_t n,
                  float scale, cudaStream_t s) {
  if (heads * n == 0) return;
  softmax_grad_kernel<<<grid_of(heads * n), threads, 0, s>>>(probs, dp, delta, row0, heads, n, scale);
  TROUPE_CUDA_CHECK_LAUNCH();
}

void head_dots(const float* a, const float* b, std::int64_t rows, std::int64_t heads, std::int64_t dim, float* delta,
               cudaStream_t s) {
  const std::int64_t pairs = rows * heads;
  if (pairs == 0) return;
  head_dots_kernel<<<blocks_for(pairs * 32), threads, 0, s>>>(a, b, pairs, dim, delta);
  TROUPE_CUDA_CHECK_LAUNCH();
}

void router_forward(float* probs, const float* bias, std::int64_t rows, std::int64_t experts, int k, float scaling,
                    std::int32_t* idx, float* gates, cudaStream_t s) {
  if (rows == 0) return;
  router_forward_kernel<<<blocks_for(rows), threads, 0, s>>>(probs, bias, rows, experts, k, scaling, idx, gates);
  TROUPE_CUDA_CHECK_LAUNCH();
}

void softmax_backward(const float* probs, const float* dprobs, std::int64_t rows, std::int64_t cols, float* dlogits,
                      cudaStream_t s) {
  if (rows == 0) return;
  softmax_backward_kernel<<<blocks_for(rows), threads, 0, s>>>(probs, dprobs, rows, cols, dlogits);
  TROUPE_CUDA_CHECK_LAUNCH();
}

void gather(const float* src, const std::int32_t* rows, std::int64_t n, std::int64_t h, float* out, cudaStream_t s) {
  if (n * h == 0) return;
  gather_kernel<<<blocks_for(n * h), threads, 0, s>>>(src, rows, checked(n * h), checked(h), out);
  TROUPE_CUDA_CHECK_LAUNCH();
}

void combine_expert(const float* y, const std::int32_t* rows, const std::int32_t* slots, const float* gates, int k,
                    std::int64_t n, std::int64_t h, float* out, cudaStream_t s) {
  if (n * h == 0) return;
  combine_expert_kernel<<<blocks_for(n * h), threads, 0, s>>>(y, rows, slots, gates, k, checked(n * h), checked(h), out);
  TROUPE_CUDA_CHECK_LAUNCH();
}

void combine_zero_experts(const float* u, const std::int32_t* idx, const float* gates, std::int64_t rows, int k,
                          std::int32_t n_routed, std::int64_t h, float* out, cudaStream_t s) {
  if (rows * h == 0) return;
  combine_zero_experts_kernel<<<blocks_for(rows * h), threads, 0, s>>>(u, idx, gates, checked(rows * h), k, n_routed,
                                                                       checked(h), out);
  TROUPE_CUDA_CHECK_LAUNCH();
}

void expert_grad(const float* dy, const float* y, const std::int32_t* rows, const std::int32_t* slots, const float* gates,
                 int k, std::int64_t n, std::int64_t h, std::int32_t expert, std::int64_t experts, float scaling,
                 float* dprobs, float* dexpert, cudaStream_t s) {
  if (n == 0) return;
  expert_grad_kernel<<<grid_of(n), threads, 0, s>>>(dy, y, rows, slots, gates, k, h, expert, experts, scaling, dprobs,
                                                     dexpert);
  TROUPE_CUDA_CHECK_LAUNCH();
}

void zero_experts_grad(const float* dy, const float* u, const std::int32_t* idx, const float* gates, std::int64_t rows,
                       int k, std::int32_t n_routed, std::int64_t experts, std::int64_t h, float scaling, float* dprobs,
                       float* du, cudaStream_t s) {
  if (rows == 0) return;
  zero_experts_grad_kernel<<<grid_of(rows), threads, 0, s>>>(dy, u, idx, gates, k, n_routed, experts, h, scaling, dprobs,
                                                              du);
  TROUPE_CUDA_CHECK_LAUNCH();
}

void gather_table_rows(const float* table, const std::int64_t* ids, std::int64_t id_stride, std::int64_t rows,
                       std::int64_t d, float* out, cudaStream_t s) {
  if (rows * d == 0) return;
  gather_table_rows_kernel<<<blocks_for(rows * d), threads, 0, s>>>(table, ids, checked(id_stride), checked(rows * d),
                                                                     checked(d), out);
  TROUPE_CUDA_CHECK_LAUNCH();
}

void scatter_add_table_rows(const float* src, const std::int64_t* ids, std::int64_t id_stride, std::int64_t rows,
                            std::int64_t d, float* grad, std::uint8_t* touched, cudaStream_t s) {
  if (rows * d == 0) return;
  scatter_add_table_rows_kernel<<<blocks_for(rows * d), threads, 0, s>>>(src, ids, checked(id_stride), checked(rows * d),
                                                                          checked(d), grad, touched);
  TROUPE_CUDA_CHECK_LAUNCH();
}

void scatter_add(const float* src, const std::int32_t* rows, std::int64_t n, std::int64_t h, float* grad, cudaStream_t s) {
  if (n * h == 0) return;
  scatter_add_kernel<<<blocks_for(n * h), threads, 0, s>>>(src, rows, checked(n * h), checked(h), grad);
  TROUPE_CUDA_CHECK_LAUNCH();
}

void cross_entropy(float* logits, const std::int32_t* targets, std::int64_t rows, std::int64_t vocab, float weight,
                   float* loss, cudaStream_t s) {
  if (rows == 0) return;
  cross_entropy_kernel<<<grid_of(rows), threads, 0, s>>>(logits, targets, vocab, weight, loss);
  TROUPE_CUDA_CHECK_LAUNCH();
}

void add_square_sum(const float* x, std::int64_t n, double* sum, cudaStream_t s) {
  if (n == 0) return;
  const unsigned grid = blocks_for(n) < 1024 ? blocks_for(n) : 1024;
  add_sum_kernel<true><<<grid, threads, 0, s>>>(x, n, sum);
  TROUPE_CUDA_CHECK_LAUNCH();
}

void add_sum(const float* x, std::int64_t n, double* sum, cudaStream_t s) {
  if (n == 0) return;
  const unsigned grid = blocks_for(n) < 1024 ? blocks_for(n) : 1024;
  add_sum_kernel<false><<<grid, threads, 0, s>>>(x, n, sum);
  TROUPE_CUDA_CHECK_LAUNCH();
}

void adamw(float* value, const float* grad, float* m, float* v, std::int64_t rows, std::int64_t cols,
           const std::uint8_t* touched, const adamw_step& step, cudaStream_t s) {
  const std::int64_t n = rows * cols;
  if (n == 0) return;
  adamw_kernel<<<blocks_for(n), threads, 0, s>>>(value, grad, m, v, checked(n), checked(cols), touched, step);
  TROUPE_CUDA_CHECK_LAUNCH();
}

}  // namespace troupe::train::cuda
