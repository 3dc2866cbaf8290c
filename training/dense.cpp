#include "training/dense.hpp"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace troupe::train {
namespace {

// C[M,N] = alpha * op(A) . op(B) + beta * C, row-major.
void gemm(bool ta, bool tb, std::int64_t m, std::int64_t n, std::int64_t k, const float* a, std::int64_t lda,
          const float* b, std::int64_t ldb, float beta, float* c, std::int64_t ldc) {
  cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, static_cast<int>(m),
              static_cast<int>(n), static_cast<int>(k), 1.0f, a, static_cast<int>(lda), b, static_cast<int>(ldb), beta,
              c, static_cast<int>(ldc));
}
void gemm(bool ta, bool tb, std::int64_t m, std::int64_t n, std::int64_t k, const double* a, std::int64_t lda,
          const double* b, std::int64_t ldb, double beta, double* c, std::int64_t ldc) {
  cblas_dgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, static_cast<int>(m),
              static_cast<int>(n), static_cast<int>(k), 1.0, a, static_cast<int>(lda), b, static_cast<int>(ldb), beta,
              c, static_cast<int>(ldc));
}

void expect_size(std::size_t got, std::int64_t want, const char* what) {
  if (static_cast<std::int64_t>(got) < want)
    throw std::logic_error(std::string(what) + ": buffer of " + std::to_string(got) + " elements, need " +
                           std::to_string(want));
}

template <class T>
T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

}  // namespace

template <class T>
void linear_forward(std::span<const T> x, std::span<const T> w, std::int64_t m, std::int64_t k, std::int64_t n,
                    std::span<T> y) {
  expect_size(x.size(), m * k, "linear_forward x");
  expect_size(w.size(), n * k, "linear_forward w");
  expect_size(y.size(), m * n, "linear_forward y");
  if (m == 0) return;
  gemm(false, true, m, n, k, x.data(), k, w.data(), k, T(0), y.data(), n);
}

template <class T>
void linear_backward(std::span<const T> dy, std::span<const T> x, std::span<const T> w, std::int64_t m,
                     std::int64_t k, std::int64_t n, std::span<T> dx, std::span<T> dw) {
  if (m == 0) return;
  if (!dx.empty()) {
    expect_size(dx.size(), m * k, "linear_backward dx");
    gemm(false, false, m, k, n, dy.data(), n, w.data(), k, T(1), dx.data(), k);
  }
  expect_size(dw.size(), n * k, "linear_backward dw");
  gemm(true, false, n, k, m, dy.data(), n, x.data(), k, T(1), dw.data(), k);
}

template <class T>
void rms_norm_forward(std::span<const T> x, std::span<const T> w, std::int64_t rows, std::int64_t cols,
                      std::int64_t stride, T eps, T post_scale, std::span<T> y, std::span<T> rms_inv) {
  for (std::int64_t r = 0; r < rows; ++r) {
    const T* xr = x.data() + r * stride;
    T ss = 0;
    for (std::int64_t c = 0; c < cols; ++c) ss += xr[c] * xr[c];
    const T inv = T(1) / std::sqrt(ss / static_cast<T>(cols) + eps);
    rms_inv[static_cast<std::size_t>(r)] = inv;
    T* yr = y.data() + r * stride;
    for (std::int64_t c = 0; c < cols; ++c) yr[c] = xr[c] * inv * w[static_cast<std::size_t>(c)] * post_scale;
  }
}

template <class T>
void rms_norm_backward(std::span<const T> dy, std::span<const T> x, std::span<const T> w, std::span<const T> rms_inv,
                       std::int64_t rows, std::int64_t cols, std::int64_t stride, T post_scale, std::span<T> dx,
                       std::span<T> dw) {
  for (std::int64_t r = 0; r < rows; ++r) {
    const T* xr = x.data() + r * stride;
    const T* gr = dy.data() + r * stride;
    const T inv = rms_inv[static_cast<std::size_t>(r)];
    // With g' = g * w * s: dx = inv * g' - x * inv^3 * mean(g' * x).
    T dot = 0;
    for (std::int64_t c = 0; c < cols; ++c) {
      const T gw = gr[c] * w[static_cast<std::size_t>(c)] * post_scale;
      dot += gw * xr[c];
      dw[static_cast<std::size_t>(c)] += gr[c] * xr[c] * inv * post_scale;
    }
    const T coef = inv * inv * inv * dot / static_cast<T>(cols);
    T* dxr = dx.data() + r * stride;
    for (std::int64_t c = 0; c < cols; ++c)
      dxr[c] += inv * gr[c] * w[static_cast<std::size_t>(c)] * post_scale - xr[c] * coef;
  }
}

template <class T>
void layer_norm_forward(std::span<const T> x, std::int64_t rows, std::int64_t cols, T eps, std::span<T> y,
                        std::span<T> std_inv) {
  for (std::int64_t r = 0; r < rows; ++r) {
    const T* xr = x.data() + r * cols;
    T mean = 0;
    for (std::int64_t c = 0; c < cols; ++c) mean += xr[c];
    mean /= static_cast<T>(cols);
    T var = 0;
    for (std::int64_t c = 0; c < cols; ++c) var += (xr[c] - mean) * (xr[c] - mean);
    const T inv = T(1) / std::sqrt(var / static_cast<T>(cols) + eps);
    std_inv[static_cast<std::size_t>(r)] = inv;
    for (std::int64_t c = 0; c < cols; ++c) y[static_cast<std::size_t>(r * cols + c)] = (xr[c] - mean) * inv;
  }
}

template <class T>
void layer_norm_backward(std::span<const T> dy, std::span<const T> y, std::span<const T> std_inv, std::int64_t rows,
                         std::int64_t cols, std::span<T> dx) {
  for (std::int64_t r = 0; r < rows; ++r) {
    const T* g = dy.data() + r * cols;
    const T* yr = y.data() + r * cols;
    T mean_g = 0, mean_gy = 0;
    for (std::int64_t c = 0; c < cols; ++c) {
      mean_g += g[c];
      mean_gy += g[c] * yr[c];
    }
    mean_g /= static_cast<T>(cols);
    mean_gy /= static_cast<T>(cols);
    const T inv = std_inv[static_cast<std::size_t>(r)];
    for (std::int64_t c = 0; c < cols; ++c) dx[static_cast<std::size_t>(r * cols + c)] += inv * (g[c] - mean_g - yr[c] * mean_gy);
  }
}

template <class T>
void matmul(transpose ta, transpose tb, std::int64_t m, std::int64_t n, std::int64_t k, const T* a, std::int64_t lda,
            const T* b, std::int64_t ldb, T beta, T* c, std::int64_t ldc) {
  if (m == 0 || n == 0) return;
  gemm(ta == transpose::yes, tb == transpose::yes, m, n, k, a, lda, b, ldb, beta, c, ldc);
}

template <class T>
void swiglu_forward(std::span<const T> gate, std::span<const T> up, std::span<T> out) {
  for (std::size_t i = 0; i < out.size(); ++i) out[i] = gate[i] * sigmoid(gate[i]) * up[i];
}

template <class T>
void swiglu_backward(std::span<const T> dout, std::span<const T> gate, std::span<const T> up, std::span<T> dgate,
                     std::span<T> dup) {
  for (std::size_t i = 0; i < dout.size(); ++i) {
    const T s = sigmoid(gate[i]);
    dgate[i] += dout[i] * up[i] * s * (T(1) + gate[i] * (T(1) - s));
    dup[i] += dout[i] * gate[i] * s;
  }
}

template <class T>
rope_table<T> make_rope_table(std::span<const float> inv_freq, float attention_factor,
                              std::span<const std::int64_t> positions) {
  rope_table<T> t;
  t.half = static_cast<std::int64_t>(inv_freq.size());
  t.cos.resize(positions.size() * inv_freq.size());
  t.sin.resize(t.cos.size());
  for (std::size_t r = 0; r < positions.size(); ++r)
    for (std::size_t i = 0; i < inv_freq.size(); ++i) {
      // The angle in float, as the inference backend computes it, so both see the same rotation.
      const float angle = static_cast<float>(positions[r]) * inv_freq[i];
      t.cos[r * inv_freq.size() + i] = static_cast<T>(std::cos(angle) * attention_factor);
      t.sin[r * inv_freq.size() + i] = static_cast<T>(std::sin(angle) * attention_factor);
    }
  return t;
}

template <class T>
void rope_apply(std::span<T> x, const rope_table<T>& rope, std::int64_t rows, std::int64_t heads, std::int64_t stride,
                std::int64_t offset, rope_direction direction) {
  const T sign = direction == rope_direction::forward ? T(1) : T(-1);
  for (std::int64_t r = 0; r < rows; ++r) {
    const T* cs = rope.cos.data() + r * rope.half;
    const T* sn = rope.sin.data() + r * rope.half;
    for (std::int64_t h = 0; h < heads; ++h) {
      T* p = x.data() + r * heads * stride + h * stride + offset;
      for (std::int64_t i = 0; i < rope.half; ++i) {
        const T a = p[2 * i], b = p[2 * i + 1];
        p[2 * i] = a * cs[i] - sign * b * sn[i];
        p[2 * i + 1] = b * cs[i] + sign * a * sn[i];
      }
    }
  }
}

template <class T>
double cross_entropy(std::span<const T> logits, std::span<const std::int32_t> targets, std::int64_t rows,
                     std::int64_t vocab, T weight, std::span<T> dlogits) {
  double total = 0;
  for (std::int64_t r = 0; r < rows; ++r) {
    const T* l = logits.data() + r * vocab;
    const std::int32_t target = targets[static_cast<std::size_t>(r)];
    T* d = dlogits.empty() ? nullptr : dlogits.data() + r * vocab;
    if (target < 0) {
      if (d) std::fill(d, d + vocab, T(0));
      continue;
    }
    const T mx = *std::max_element(l, l + vocab);
    T sum = 0;
    if (d) {  // one exp per logit: kept in dlogits, then scaled into the softmax
      for (std::int64_t v = 0; v < vocab; ++v) sum += (d[v] = std::exp(l[v] - mx));
    } else {
      for (std::int64_t v = 0; v < vocab; ++v) sum += std::exp(l[v] - mx);
    }
    const T lse = mx + std::log(sum);
    total += static_cast<double>((lse - l[target]) * weight);
    if (d) {
      const T scale = weight / sum;
      for (std::int64_t v = 0; v < vocab; ++v) d[v] *= scale;
      d[target] -= weight;
    }
  }
  return total;
}

#define TROUPE_INSTANTIATE(T)                                                                                         \
  template void linear_forward<T>(std::span<const T>, std::span<const T>, std::int64_t, std::int64_t, std::int64_t,  \
                                  std::span<T>);                                                                      \
  template void linear_backward<T>(std::span<const T>, std::span<const T>, std::span<const T>, std::int64_t,         \
                                   std::int64_t, std::int64_t, std::span<T>, std::span<T>);                           \
  template void rms_norm_forward<T>(std::span<const T>, std::span<const T>, std::int64_t, std::int64_t, std::int64_t, \
                                    T, T, std::span<T>, std::span<T>);                                                \
  template void rms_norm_backward<T>(std::span<const T>, std::span<const T>, std::span<const T>, std::span<const T>,  \
                                     std::int64_t, std::int64_t, std::int64_t, T, std::span<T>, std::span<T>);        \
  template void layer_norm_forward<T>(std::span<const T>, std::int64_t, std::int64_t, T, std::span<T>, std::span<T>); \
  template void layer_norm_backward<T>(std::span<const T>, std::span<const T>, std::span<const T>, std::int64_t,     \
                                       std::int64_t, std::span<T>);                                                   \
  template void matmul<T>(transpose, transpose, std::int64_t, std::int64_t, std::int64_t, const T*, std::int64_t,   \
                          const T*, std::int64_t, T, T*, std::int64_t);                                               \
  template void swiglu_forward<T>(std::span<const T>, std::span<const T>, std::span<T>);                              \
  template void swiglu_backward<T>(std::span<const T>, std::span<const T>, std::span<const T>, std::span<T>,          \
                                   std::span<T>);                                                                     \
  template rope_table<T> make_rope_table<T>(std::span<const float>, float, std::span<const std::int64_t>);           \
  template void rope_apply<T>(std::span<T>, const rope_table<T>&, std::int64_t, std::int64_t, std::int64_t,          \
                              std::int64_t, rope_direction);                                                          \
  template double cross_entropy<T>(std::span<const T>, std::span<const std::int32_t>, std::int64_t, std::int64_t, T, \
                                   std::span<T>);

TROUPE_INSTANTIATE(float)
TROUPE_INSTANTIATE(double)
#undef TROUPE_INSTANTIATE

}  // namespace troupe::train
