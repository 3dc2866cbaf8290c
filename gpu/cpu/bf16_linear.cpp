#include "gpu/cpu/bf16_linear.hpp"

#include <cblas.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "gpu/cpu/thread_pool.hpp"

namespace troupe {
namespace {

constexpr int lanes = 16;  // one 512-bit vector of floats
constexpr int rows_per_pass = 4;  // weight rows in flight: independent FMA chains, more loads queued

typedef float f32x16 __attribute__((vector_size(64)));
typedef std::uint32_t u32x16 __attribute__((vector_size(64)));
typedef std::uint16_t u16x16 __attribute__((vector_size(32)));

inline float widen(std::uint16_t v) {
  const std::uint32_t bits = static_cast<std::uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline f32x16 widen16(const std::uint16_t* p) {
  u16x16 h;
  std::memcpy(&h, p, sizeof h);
  const u32x16 bits = __builtin_convertvector(h, u32x16) << 16;
  f32x16 f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline f32x16 load16(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// M rows of x against R weight rows starting at `row`: each weight element is read once.
template <int M, int R>
void stream_block(const float* x, const std::uint16_t* w, float* y, std::int64_t row, std::int64_t n, std::int64_t k,
                  bool accumulate) {
  const std::int64_t k_vec = k - k % lanes;
  f32x16 acc[R][M] = {};
  for (std::int64_t c = 0; c < k_vec; c += lanes) {
    f32x16 xv[M];
    for (int r = 0; r < M; ++r) xv[r] = load16(x + r * k + c);
    for (int i = 0; i < R; ++i) {
      const f32x16 wv = widen16(w + (row + i) * k + c);
      for (int r = 0; r < M; ++r) acc[i][r] += wv * xv[r];
    }
  }
  for (int i = 0; i < R; ++i)
    for (int r = 0; r < M; ++r) {
      float sum = 0.0f;
      for (int j = 0; j < lanes; ++j) sum += acc[i][r][j];
      for (std::int64_t c = k_vec; c < k; ++c) sum += widen(w[(row + i) * k + c]) * x[r * k + c];
      float& out = y[r * n + row + i];
      out = accumulate ? out + sum : sum;
    }
}

template <int M>
void stream_rows(const float* x, const std::uint16_t* w, float* y, std::int64_t n0, std::int64_t n1, std::int64_t n,
                 std::int64_t k, bool accumulate) {
  std::int64_t row = n0;
  for (; row + rows_per_pass <= n1; row += rows_per_pass) stream_block<M, rows_per_pass>(x, w, y, row, n, k, accumulate);
  for (; row < n1; ++row) stream_block<M, 1>(x, w, y, row, n, k, accumulate);
}

template <int M>
void stream(const float* x, const std::uint16_t* w, float* y, std::int64_t n, std::int64_t k, bool accumulate,
            thread_pool& pool) {
  pool.parallel_for(n, [&](std::int64_t n0, std::int64_t n1) { stream_rows<M>(x, w, y, n0, n1, n, k, accumulate); });
}

}  // namespace

void linear_bf16(const float* x, const std::uint16_t* w, float* y, std::int64_t m, std::int64_t n, std::int64_t k,
                 bool accumulate, thread_pool& pool) {
  if (m <= bf16_stream_max_m) {
    // Up to bf16_small_m rows per pass over the weights: a few passes of bf16 still move fewer
    // bytes than widening the matrix for sgemm (verification and small decode batches).
    for (std::int64_t r0 = 0; r0 < m; r0 += bf16_small_m) {
      const float* xr = x + r0 * k;
      float* yr = y + r0 * n;
      switch (std::min(bf16_small_m, m - r0)) {
        case 1: stream<1>(xr, w, yr, n, k, accumulate, pool); break;
        case 2: stream<2>(xr, w, yr, n, k, accumulate, pool); break;
        case 3: stream<3>(xr, w, yr, n, k, accumulate, pool); break;
        default: stream<4>(xr, w, yr, n, k, accumulate, pool); break;
      }
    }
    return;
  }
  // Larger M: widen weight rows to float32 and let sgemm reuse them over M. Blocks are as
  // large as 32 MB of scratch allows, so x is packed once per block, usually once in all.
  const std::int64_t block = std::max<std::int64_t>(256, (std::int64_t(32) << 20) / (4 * k));
  std::vector<float> wide(static_cast<std::size_t>(std::min(block, n) * k));
  for (std::int64_t n0 = 0; n0 < n; n0 += block) {
    const std::int64_t rows = std::min(block, n - n0);
    pool.parallel_for(rows * k, [&](std::int64_t b, std::int64_t e) {
      for (std::int64_t i = b; i < e; ++i) wide[static_cast<std::size_t>(i)] = widen(w[n0 * k + i]);
    });
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, rows, k, 1.0f, x, k, wide.data(), k,
                accumulate ? 1.0f : 0.0f, y + n0, n);
  }
}

}  // namespace troupe
