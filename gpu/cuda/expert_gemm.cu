// The routed experts on tensor cores for steps beyond the grouped GEMVs (batched decode,
// verification, prefill): a grouped GEMM over exactly each expert's slots, as moe_route groups
// them on the device. No host round trip and no padding to the row count: a block takes a 64-row
// tile of one expert's slots, found by walking the experts' tile counts from `offsets`.
#include <cuda_bf16.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "gpu/cuda/cuda_kernels.hpp"
#include "gpu/cuda/launch.cuh"
#include "gpu/cuda/mma.cuh"
#include "gpu/cuda/swiglu.cuh"

namespace troupe::cuda {
namespace {

constexpr int tile_m = 64;    // slots a block
constexpr int tile_n = 128;   // weight rows a block (SwiGLU: 64 gate rows and their 64 up rows)
constexpr int tile_k = 32;    // columns a pipeline stage
constexpr int stages = 3;     // stages of copies in flight
constexpr int gemm_threads = 256;  // 8 warps: 2 down the slots by 4 across the weight rows, 32 x 32 each
constexpr int row_pad = 8;    // bf16 past each shared row: fragment loads of a warp hit 32 banks
constexpr int stride = tile_k + row_pad;

// x[i] = bf16(u[order[i] / k]): the slots' rows in expert order, [slots, h]; rows past the routed
// slots (offsets[n_routed]) are left alone.
__global__ void gather_slots_kernel(const float* u, std::int64_t h, int k, const std::int32_t* offsets, std::int32_t n_routed,
                                    const std::int32_t* order, __nv_bfloat16* x) {
  follow_previous();
  const std::int64_t i = blockIdx.x;
  if (i >= offsets[n_routed]) return;
  const float* src = u + static_cast<std::int64_t>(order[i] / k) * h;
  for (std::int64_t c = threadIdx.x; c < h; c += blockDim.x) x[i * h + c] = __float2bfloat16(src[c]);
}

struct gemm_args {
  const __nv_bfloat16* x;                  // [slots, k] in expert order
  const std::int32_t* offsets;             // [n_routed + 1]
  std::int32_t n_routed;
  const __nv_bfloat16* const* weights;     // n_routed matrices [n (x2 with SwiGLU), k]
  std::int64_t k, n;
  const std::int32_t* order;               // slot of each row (the down projection's scatter)
  __nv_bfloat16* act;                      // SwiGLU: [slots, n]
  float* y;                                // down: y[order[i], :n]
};

// Swiglu: act[i, c] = SwiGLU(x_i . W_e[c], x_i . W_e[n + c]), the gate and up rows of a column
// side by side in one warp's fragments. Otherwise y[order[i], c] = x_i . W_e[c].
template <bool Swiglu, bool Aligned>
__global__ void __launch_bounds__(gemm_threads) expert_gemm_kernel(gemm_args a) {
  __shared__ __align__(16) __nv_bfloat16 xs[stages][tile_m][stride];
  __shared__ __align__(16) __nv_bfloat16 ws[stages][tile_n][stride];
  follow_previous();
  // This block's expert and its tile of that expert's slots.
  std::int32_t e = 0, tile = static_cast<std::int32_t>(blockIdx.y), begin = 0, count = 0;
  for (; e < a.n_routed; ++e) {
    begin = a.offsets[e];
    count = a.offsets[e + 1] - begin;
    const std::int32_t tiles = (count + tile_m - 1) / tile_m;
    if (tile < tiles) break;
    tile -= tiles;
  }
  if (e == a.n_routed) return;  // past the last expert's tiles: the grid is sized for the worst case
  const std::int64_t m0 = begin + static_cast<std::int64_t>(tile) * tile_m, m_end = begin + count;
  const __nv_bfloat16* w = a.weights[e];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int wm = warp / 4, wn = warp % 4;
  // Shared weight row i and the matrix row it holds (-1: past the end): SwiGLU interleaves each
  // warp's 16 gate rows with the 16 up rows of the same columns.
  const std::int64_t n0 = static_cast<std::int64_t>(blockIdx.x) * (Swiglu ? tile_n / 2 : tile_n);
  const auto weight_row = [&](int i) -> std::int64_t {
    if (!Swiglu) return n0 + i < a.n ? n0 + i : -1;
    const std::int64_t col = n0 + (i / 32) * 16 + i % 16;
    return col < a.n ? (i % 32 < 16 ? col : a.n + col) : -1;
  };
  // A stage: 16-byte asynchronous copies where rows are 16-byte aligned (k % 8 == 0), else
  // element by element (small test models), zeros past the ends either way.
  const auto load_stage = [&](int stage, std::int64_t k0) {
    constexpr int chunks = tile_k / 8;  // 8 bf16 a chunk
    for (int c = threadIdx.x; c < (tile_m + tile_n) * chunks; c += gemm_threads) {
      const int r = c / chunks, col = (c % chunks) * 8;
      const bool x_row = r < tile_m;
      const std::int64_t row = x_row ? (m0 + r < m_end ? m0 + r : -1) : weight_row(r - tile_m);
      const __nv_bfloat16* src = x_row ? a.x : w;
      __nv_bfloat16* dst = x_row ? &xs[stage][r][col] : &ws[stage][r - tile_m][col];
      if constexpr (Aligned) {
        const bool ok = row >= 0 && k0 + col < a.k;
        copy_async16(dst, ok ? src + row * a.k + k0 + col : src, ok);
      } else {
        for (int j = 0; j < 8; ++j)
          dst[j] = row >= 0 && k0 + col + j < a.k ? src[row * a.k + k0 + col + j] : __float2bfloat16(0.0f);
      }
    }
  };

  float acc[2][4][4] = {};  // [m16 tile][n8 tile][fragment]
  const std::int64_t steps = (a.k + tile_k - 1) / tile_k;
  for (int s = 0; s < stages - 1; ++s) {
    if (s < steps) load_stage(s, s * tile_k);
    commit_copies();
  }
  for (std::int64_t step = 0; step < steps; ++step) {
    wait_copies<stages - 2>();
    __syncthreads();  // this step's stage is in, and every warp is done with the stage refilled next
    const std::int64_t next = step + stages - 1;
    if (next < steps) load_stage(static_cast<int>(next % stages), next * tile_k);
    commit_copies();
    const int st = static_cast<int>(step % stages);
#pragma unroll
    for (int kk = 0; kk < tile_k; kk += 16) {
      std::uint32_t af[2][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        const __nv_bfloat16* p = &xs[st][wm * 32 + mt * 16 + g][kk + 2 * t];
        af[mt][0] = load_pair(p);
        af[mt][1] = load_pair(p + 8 * stride);
        af[mt][2] = load_pair(p + 8);
        af[mt][3] = load_pair(p + 8 * stride + 8);
      }
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        const __nv_bfloat16* p = &ws[st][wn * 32 + nt * 8 + g][kk + 2 * t];
        const std::uint32_t b0 = load_pair(p), b1 = load_pair(p + 8);
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) mma_bf16(acc[mt][nt], af[mt], b0, b1);
      }
    }
  }

#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const std::int64_t row = m0 + wm * 32 + mt * 16 + g + 8 * i;
      if (row >= m_end) continue;
      if constexpr (Swiglu) {
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {  // n8 tiles 0, 1 are gate columns; 2, 3 the same columns' up
          const std::int64_t col = n0 + wn * 16 + nt * 8 + 2 * t;
          if (col >= a.n) continue;
          const float* gate = &acc[mt][nt][2 * i];
          const float* up = &acc[mt][nt + 2][2 * i];
          *reinterpret_cast<std::uint32_t*>(a.act + row * a.n + col) =
              pack_bf16(swiglu_value(gate[0], up[0]), swiglu_value(gate[1], up[1]));
        }
      } else {
        float* dst = a.y + static_cast<std::int64_t>(a.order[row]) * a.n;
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
          const std::int64_t col = n0 + wn * 32 + nt * 8 + 2 * t;
          if (col < a.n) *reinterpret_cast<float2*>(dst + col) = make_float2(acc[mt][nt][2 * i], acc[mt][nt][2 * i + 1]);
        }
      }
    }
}

// Enough row tiles for any split of `slots` slots among n_routed experts.
unsigned row_tiles(std::int64_t slots, std::int32_t n_routed) {
  return static_cast<unsigned>((slots + tile_m - 1) / tile_m + n_routed);
}

}  // namespace

void expert_gemms(const expert_gemm_args& a, cudaStream_t s) {
  if (a.slots == 0) return;
  if (a.h % 2 != 0 || a.f % 2 != 0)
    throw std::invalid_argument("expert GEMMs: hidden size " + std::to_string(a.h) + " and expert width " + std::to_string(a.f) +
                                " must be even");
  const auto* gate_up = reinterpret_cast<const __nv_bfloat16* const*>(a.gate_up);
  const auto* down = reinterpret_cast<const __nv_bfloat16* const*>(a.down);
  auto* x = reinterpret_cast<__nv_bfloat16*>(a.x);
  auto* act = reinterpret_cast<__nv_bfloat16*>(a.act);
  launch(gather_slots_kernel, static_cast<unsigned>(a.slots), 256, 0, s, a.u, a.h, a.k, a.offsets, a.n_routed, a.order, x);
  const unsigned tiles = row_tiles(a.slots, a.n_routed);
  const dim3 up_grid(static_cast<unsigned>((a.f + tile_n / 2 - 1) / (tile_n / 2)), tiles);
  const gemm_args up{x, a.offsets, a.n_routed, gate_up, a.h, a.f, a.order, act, nullptr};
  a.h % 8 == 0 ? launch(expert_gemm_kernel<true, true>, up_grid, gemm_threads, 0, s, up)
               : launch(expert_gemm_kernel<true, false>, up_grid, gemm_threads, 0, s, up);
  const dim3 down_grid(static_cast<unsigned>((a.h + tile_n - 1) / tile_n), tiles);
  const gemm_args down_args{act, a.offsets, a.n_routed, down, a.f, a.h, a.order, nullptr, a.y};
  a.f % 8 == 0 ? launch(expert_gemm_kernel<false, true>, down_grid, gemm_threads, 0, s, down_args)
               : launch(expert_gemm_kernel<false, false>, down_grid, gemm_threads, 0, s, down_args);
}

}  // namespace troupe::cuda
