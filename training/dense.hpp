// Forward and backward math of the model's element-wise and dense pieces on host arrays, for
// T = float (training) and T = double (the finite-difference checks). Row-major throughout:
// an activation x is [rows, cols], a weight w is [out, in] as in the checkpoint.
//
// Invariant: every *_backward accumulates (+=) into the gradients it is given and never
// overwrites them, so a parameter used by several rows, micro-batches or layers sums its
// contributions; callers zero gradients once per optimizer step.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

namespace troupe::train {

template <class T>
using buffer = std::vector<T>;

/// y[M,N] = x[M,K] . w[N,K]^T   (overwrite)
template <class T>
void linear_forward(std::span<const T> x, std::span<const T> w, std::int64_t m, std::int64_t k, std::int64_t n,
                    std::span<T> y);
/// dx[M,K] += dy[M,N] . w[N,K];  dw[N,K] += dy^T . x   (dx may be empty: not needed)
template <class T>
void linear_backward(std::span<const T> dy, std::span<const T> x, std::span<const T> w, std::int64_t m,
                     std::int64_t k, std::int64_t n, std::span<T> dx, std::span<T> dw);

/// y = x / rms(x) * w * post_scale row-wise over `cols`; rms_inv[r] = 1 / rms(x[r]) is kept
/// for the backward. x and y have row stride `stride` (>= cols), so a prefix can be normalised.
template <class T>
void rms_norm_forward(std::span<const T> x, std::span<const T> w, std::int64_t rows, std::int64_t cols,
                      std::int64_t stride, T eps, T post_scale, std::span<T> y, std::span<T> rms_inv);
template <class T>
void rms_norm_backward(std::span<const T> dy, std::span<const T> x, std::span<const T> w, std::span<const T> rms_inv,
                       std::int64_t rows, std::int64_t cols, std::int64_t stride, T post_scale, std::span<T> dx,
                       std::span<T> dw);

/// Parameter-free layer norm (mean 0, variance 1 per row): the embedding amplification option.
template <class T>
void layer_norm_forward(std::span<const T> x, std::int64_t rows, std::int64_t cols, T eps, std::span<T> y,
                        std::span<T> std_inv);
template <class T>
void layer_norm_backward(std::span<const T> dy, std::span<const T> y, std::span<const T> std_inv, std::int64_t rows,
                         std::int64_t cols, std::span<T> dx);

/// C[M,N] = op(A) . op(B) + beta * C with leading dimensions (row-major), for strided views
/// such as one head's columns of a [T, heads * dim] activation.
enum class transpose : std::uint8_t { no, yes };
template <class T>
void matmul(transpose ta, transpose tb, std::int64_t m, std::int64_t n, std::int64_t k, const T* a, std::int64_t lda,
            const T* b, std::int64_t ldb, T beta, T* c, std::int64_t ldc);

/// out = silu(gate) * up, element-wise over n values.
template <class T>
void swiglu_forward(std::span<const T> gate, std::span<const T> up, std::span<T> out);
/// dgate += ..., dup += ... from dout.
template <class T>
void swiglu_backward(std::span<const T> dout, std::span<const T> gate, std::span<const T> up, std::span<T> dgate,
                     std::span<T> dup);

/// Rotation angles of interleaved RoPE for each row's position: cos/sin [rows, half], already
/// multiplied by the attention factor (YaRN).
template <class T>
struct rope_table {
  std::vector<T> cos, sin;
  std::int64_t half = 0;
};
template <class T>
rope_table<T> make_rope_table(std::span<const float> inv_freq, float attention_factor,
                              std::span<const std::int64_t> positions);
/// Rotates in place the pairs of columns [offset, offset + 2*half) of each head block of
/// x[rows, heads*stride]; direction inverse applies the transpose (the backward).
enum class rope_direction : std::uint8_t { forward, inverse };
template <class T>
void rope_apply(std::span<T> x, const rope_table<T>& rope, std::int64_t rows, std::int64_t heads, std::int64_t stride,
                std::int64_t offset, rope_direction direction);

/// Mean cross-entropy pieces of one chunk: for each row with target >= 0, adds
/// (logsumexp - logit[target]) * weight to the returned sum and, when dlogits is not empty,
/// writes dlogits = (softmax - onehot) * weight (rows with target < 0 get 0).
template <class T>
double cross_entropy(std::span<const T> logits, std::span<const std::int32_t> targets, std::int64_t rows,
                     std::int64_t vocab, T weight, std::span<T> dlogits);

}  // namespace troupe::train
