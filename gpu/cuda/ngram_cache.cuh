// The device N-gram hash (spec section 2) as one slot's context gives it, shared by the cache's
// own kernel (ngram_cache.cu) and the fused n-gram embedding (cuda_kernels.cu), so both give
// the CPU ngram_hasher's ids. 128-bit products are not needed: each term s_k * (V^k mod M) < V * M,
// summed in unsigned 64-bit, as the cache's constructor checks.
#pragma once

#include <cstdint>

#include "gpu/cuda/ngram_cache.hpp"

namespace troupe {

/// Table t's id of token x as the next token of `slot`.
__device__ inline std::int64_t ngram_table_id(const ngram_cache_view& c, int slot, std::int32_t x, int t) {
  const std::int32_t* tail = c.tails + static_cast<std::int64_t>(slot) * c.width;
  const int len = c.lengths[slot];
  const std::int64_t m = c.moduli[t];
  unsigned long long h = static_cast<unsigned long long>(x) % m;
  for (int k = 1; k <= c.width && k <= len; ++k) {
    const auto p = static_cast<unsigned long long>(c.powers[t * c.width + k - 1]);
    if (p == 0) break;  // beyond this table's order
    h = (h + static_cast<unsigned long long>(tail[len - k]) * p) % m;
  }
  return static_cast<std::int64_t>(h);
}

/// Moves `slot`'s context past x (an end of text empties it). One thread, after every id of x
/// has been read from the old context.
__device__ inline void ngram_advance(const ngram_cache_view& c, int slot, std::int32_t x) {
  std::int32_t* tail = c.tails + static_cast<std::int64_t>(slot) * c.width;
  const int len = c.lengths[slot];
  if (x == c.eos) {
    c.lengths[slot] = 0;
  } else if (c.width > 0) {
    if (len == c.width) {
      for (int k = 1; k < c.width; ++k) tail[k - 1] = tail[k];
      tail[c.width - 1] = x;
    } else {
      tail[len] = x;
      c.lengths[slot] = len + 1;
    }
  }
}

}  // namespace troupe
