// y[M,N] (=|+=) x[M,K] . w[N,K]^T with bf16 weights and float32 activations/accumulation.
// bf16 -> f32 is exact, so this computes the same products as a float32 GEMM on the widened
// weights while reading half the bytes: decode (small M) is bound by weight bandwidth.
// Invariant: each output element is a float32 dot product over K in a fixed order that does
// not depend on the thread count or on M (for M <= bf16_stream_max_m).
#pragma once

#include <cstdint>

namespace troupe {

class thread_pool;

/// Rows of x the streaming kernel takes per pass over the weights.
constexpr std::int64_t bf16_small_m = 4;
/// Rows of x up to which the streaming kernel is used (in passes of bf16_small_m); larger M
/// widens weight blocks and calls sgemm.
constexpr std::int64_t bf16_stream_max_m = 16;

void linear_bf16(const float* x, const std::uint16_t* w, float* y, std::int64_t m, std::int64_t n, std::int64_t k,
                 bool accumulate, thread_pool& pool);

}  // namespace troupe
