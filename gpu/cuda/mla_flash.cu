// Causal MLA prefill attention, flash-style: per block of 64 query rows of one head, the keys
// and values stream through shared memory 64 at a time and the softmax is taken online, so the
// scores never leave registers. Operands are bf16 on tensor cores (mma.cuh), accumulation float32.
#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "gpu/cuda/cuda_kernels.hpp"
#include "gpu/cuda/launch.cuh"
#include "gpu/cuda/mma.cuh"

namespace troupe::cuda {
namespace {

constexpr int flash_rows = 64;  // query rows a block, 16 a warp (one MMA row tile)
constexpr int flash_keys = 64;  // keys a tile
constexpr int flash_threads = 128;
constexpr int smem_pad = 8;  // bf16 past each shared row: a warp's fragment loads then hit 32 different banks
static_assert(flash_rows == mla_prefill_tile && flash_keys == mla_prefill_tile, "the operands are padded to whole tiles");

struct flash_args {
  const __nv_bfloat16* q;          // [heads, rows_pad, qk_pad], rope columns rotated
  const __nv_bfloat16* k;          // [heads, keys_pad, qk_pad]
  const __nv_bfloat16* vt;         // [heads, v_pad, keys_pad]: the values transposed
  const std::int64_t* positions;   // per step row
  const std::int32_t* row_ids;     // [rows]: each query's step row
  std::int64_t rows, rows_pad, keys, keys_pad, heads, qk_pad, v, v_pad;
  float scale_log2;                // softmax scale * log2(e): the softmax runs in base 2
  float* out;                      // [step rows, heads * v]
};

// QK16 / V8: the most 16-column key steps and 8-column value tiles an instantiation holds in
// registers; the layout's own counts (qk_pad / 16, v_pad / 8) may be fewer.
template <int QK16, int V8>
__global__ void __launch_bounds__(flash_threads) mla_flash_kernel(flash_args a) {
  __shared__ __align__(16) __nv_bfloat16 ks[flash_keys][QK16 * 16 + smem_pad];
  __shared__ __align__(16) __nv_bfloat16 vs[V8 * 8][flash_keys + smem_pad];
  __shared__ int block_end;  // keys any row of the block sees
  follow_previous();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  // Blocks are handed out in index order, every head of a query tile before the next tile, the
  // last tiles (which see the most keys) first: the longest blocks start first instead of in the
  // last wave.
  const std::int64_t tile = gridDim.y - 1 - blockIdx.y;
  const std::int64_t h = blockIdx.x, row0 = tile * flash_rows + warp * 16;
  const int qk16 = static_cast<int>(a.qk_pad / 16), v8 = static_cast<int>(a.v_pad / 8);

  // This thread's two rows (g and g + 8 of the warp's tile) see keys [0, visible); padding rows none.
  std::int64_t visible[2];
  for (int i = 0; i < 2; ++i) {
    const std::int64_t r = row0 + g + 8 * i;
    visible[i] = r < a.rows ? a.positions[a.row_ids[r]] + 1 : 0;
  }
  if (threadIdx.x == 0) block_end = 0;
  __syncthreads();
  atomicMax(&block_end, static_cast<int>(max(visible[0], visible[1])));
  __syncthreads();
  const std::int64_t end = min(static_cast<std::int64_t>(block_end), a.keys);

  std::uint32_t qf[QK16][4];  // the warp's 16 query rows as A fragments, for the whole loop
  const __nv_bfloat16* q = a.q + (h * a.rows_pad + row0 + g) * a.qk_pad + 2 * t;
#pragma unroll
  for (int kt = 0; kt < QK16; ++kt)
    if (kt < qk16) {
      const __nv_bfloat16* p = q + kt * 16;
      qf[kt][0] = load_pair(p);
      qf[kt][1] = load_pair(p + 8 * a.qk_pad);
      qf[kt][2] = load_pair(p + 8);
      qf[kt][3] = load_pair(p + 8 * a.qk_pad + 8);
    }

  const __nv_bfloat16* kh = a.k + h * a.keys_pad * a.qk_pad;
  const __nv_bfloat16* vh = a.vt + h * a.v_pad * a.keys_pad;
  const auto load_keys = [&](std::int64_t j0) {
    const int chunks = qk16 * 2;  // 16-byte chunks a key row
    for (int c = threadIdx.x; c < flash_keys * chunks; c += flash_threads) {
      const int r = c / chunks, col = (c % chunks) * 8;
      copy_async16(&ks[r][col], kh + (j0 + r) * a.qk_pad + col, true);
    }
  };
  const auto load_values = [&](std::int64_t j0) {
    constexpr int chunks = flash_keys / 8;
    for (int c = threadIdx.x; c < v8 * 8 * chunks; c += flash_threads) {
      const int r = c / chunks, col = (c % chunks) * 8;
      copy_async16(&vs[r][col], vh + r * a.keys_pad + j0 + col, true);
    }
  };

  float o[V8][4] = {};
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};  // running max (base 2) and this thread's part of the sum
  // Copy groups: keys(0), values(0), then per tile keys(j + 1) and values(j + 1), committed even when
  // empty, so "all but the latest group" is always the buffer about to be read.
  if (end > 0) load_keys(0);
  commit_copies();
  if (end > 0) load_values(0);
  commit_copies();
  for (std::int64_t j0 = 0; j0 < end; j0 += flash_keys) {
    wait_copies<1>();
    __syncthreads();  // this tile's keys are in
    float s[flash_keys / 8][4] = {};
#pragma unroll
    for (int kt = 0; kt < QK16; ++kt)
      if (kt < qk16)
#pragma unroll
        for (int nt = 0; nt < flash_keys / 8; ++nt) {
          const __nv_bfloat16* kr = &ks[nt * 8 + g][kt * 16 + 2 * t];
          mma_bf16(s[nt], qf[kt], load_pair(kr), load_pair(kr + 8));
        }
    __syncthreads();  // every warp is done with the keys
    if (j0 + flash_keys < end) load_keys(j0 + flash_keys);
    commit_copies();

    // Online softmax of each row: mask keys past the row's position, rescale what came before.
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float mx = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < flash_keys / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const std::int64_t key = j0 + nt * 8 + 2 * t + e;
          float& x = s[nt][2 * i + e];
          x = key < visible[i] ? x * a.scale_log2 : -INFINITY;
          mx = fmaxf(mx, x);
        }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));  // the four threads of a row
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m[i], mx);
      const float base = m_new == -INFINITY ? 0.0f : m_new;  // a row that sees no key yet keeps zeros
      const float alpha = exp2f(m[i] - base);
      float sum = 0.0f;
#pragma unroll
      for (int nt = 0; nt < flash_keys / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float& x = s[nt][2 * i + e];
          x = exp2f(x - base);
          sum += x;
        }
      l[i] = l[i] * alpha + sum;
      m[i] = m_new;
#pragma unroll
      for (int vt = 0; vt < V8; ++vt) o[vt][2 * i] *= alpha, o[vt][2 * i + 1] *= alpha;
    }

    wait_copies<1>();
    __syncthreads();  // this tile's values are in
#pragma unroll
    for (int kc = 0; kc < flash_keys / 16; ++kc) {
      const std::uint32_t p[4] = {pack_bf16(s[2 * kc][0], s[2 * kc][1]), pack_bf16(s[2 * kc][2], s[2 * kc][3]),
                                  pack_bf16(s[2 * kc + 1][0], s[2 * kc + 1][1]), pack_bf16(s[2 * kc + 1][2], s[2 * kc + 1][3])};
#pragma unroll
      for (int vt = 0; vt < V8; ++vt)
        if (vt < v8) {
          const __nv_bfloat16* vr = &vs[vt * 8 + g][kc * 16 + 2 * t];
          mma_bf16(o[vt], p, load_pair(vr), load_pair(vr + 8));
        }
    }
    __syncthreads();  // every warp is done with the values
    if (j0 + flash_keys < end) load_values(j0 + flash_keys);
    commit_copies();
  }

#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
    const std::int64_t r = row0 + g + 8 * i;
    if (r >= a.rows) continue;
    const float inv = 1.0f / l[i];  // a real row sees at least its own key
    float* dst = a.out + (static_cast<std::int64_t>(a.row_ids[r]) * a.heads + h) * a.v;
#pragma unroll
    for (int vt = 0; vt < V8; ++vt)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const std::int64_t c = vt * 8 + 2 * t + e;
        if (vt < v8 && c < a.v) dst[c] = o[vt][2 * i + e] * inv;
      }
  }
}

}  // namespace

void mla_flash_prefill(const mla_prefill_shape& p, const std::uint16_t* q, const std::uint16_t* k, const std::uint16_t* vt,
                       const std::int64_t* positions, const std::int32_t* row_ids, float softmax_scale, float* out,
                       cudaStream_t s) {
  if (p.rows == 0) return;
  const flash_args a{reinterpret_cast<const __nv_bfloat16*>(q), reinterpret_cast<const __nv_bfloat16*>(k),
                     reinterpret_cast<const __nv_bfloat16*>(vt), positions, row_ids, p.rows, p.rows_pad, p.keys, p.keys_pad,
                     p.heads, p.qk_pad, p.v, p.v_pad, softmax_scale * static_cast<float>(M_LOG2E), out};
  const dim3 grid(static_cast<unsigned>(p.heads), static_cast<unsigned>(p.rows_pad / flash_rows));
  if (p.qk_pad <= 64 && p.v_pad <= 64)
    launch(mla_flash_kernel<4, 8>, grid, flash_threads, 0, s, a);
  else if (p.qk_pad <= 192 && p.v_pad <= 128)
    launch(mla_flash_kernel<12, 16>, grid, flash_threads, 0, s, a);
  else
    throw std::invalid_argument("MLA prefill: heads of " + std::to_string(p.nope + p.rope) + " query/key and " +
                                std::to_string(p.v) + " value columns (the flash kernel takes at most 192 and 128)");
}

}  // namespace troupe::cuda
