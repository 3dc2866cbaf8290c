// The N-gram cache on the device: each live sequence's last N-1 tokens of its current segment
// live in GPU memory, and one kernel per decode step hashes every sequence's new token against
// them and advances them (this class's own kernel, or the fused n-gram embedding through view()),
// so decoding needs no host round trip for the n-gram ids.
// Invariant: ids and cache contents equal the CPU ngram_hasher's for the same token stream.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <vector>

namespace troupe {

struct model_config;

/// The cache as kernels read it (ngram_cache.cuh hashes and advances through it).
struct ngram_cache_view {
  const std::int64_t* moduli = nullptr;  // [E]
  const std::int64_t* powers = nullptr;  // [E, width]: V^k mod M_i, 0 beyond the table's order
  std::int32_t* tails = nullptr;         // [slots, width], oldest first
  std::int32_t* lengths = nullptr;       // [slots]
  // Blocks of one launch that have read the contexts: a kernel whose every block hashes (the
  // fused n-gram embedding) lets the last one to arrive advance them, then sets it back to 0.
  unsigned* arrivals = nullptr;
  int num_tables = 0, width = 0;
  std::int32_t eos = 0;
};

class device_ngram_cache {
 public:
  /// Space for `max_sequences` sequences of `config` (slots 0..max_sequences-1, all empty).
  device_ngram_cache(const model_config& config, int max_sequences);
  ~device_ngram_cache();
  device_ngram_cache(const device_ngram_cache&) = delete;
  device_ngram_cache& operator=(const device_ngram_cache&) = delete;

  int num_tables() const { return num_tables_; }
  int context_width() const { return width_; }
  int max_sequences() const { return max_sequences_; }
  ngram_cache_view view() const { return {moduli_, powers_, tails_, lengths_, arrivals_, num_tables_, width_, eos_}; }

  /// Empties a slot (a new sequence), asynchronously on `stream`.
  void reset_async(int slot, cudaStream_t stream);
  /// Sets a slot's context to the last context_width() of the `size` tokens at `tail` (oldest
  /// first); `tail` is free again when this returns.
  void set(int slot, const std::int32_t* tail, std::size_t size, cudaStream_t stream);
  /// For each i: hashes tokens[i] (device, i32) as the next token of sequence slots[i]
  /// (device, i32) into ids[i * num_tables() ...] (device, i64) and advances that slot.
  /// Slots in one call must be distinct. `table_major`: ids[t * count + i] instead.
  void hash_decode_async(const std::int32_t* tokens, const std::int32_t* slots, int count, std::int64_t* ids,
                         cudaStream_t stream, bool table_major = false);
  /// Copies the context of one slot to the host (tests, diagnostics); synchronises `stream`.
  std::vector<std::int32_t> context(int slot, cudaStream_t stream) const;

 private:
  int num_tables_, width_, max_sequences_;
  std::int32_t eos_;
  std::int64_t* moduli_ = nullptr;   // [E]
  std::int64_t* powers_ = nullptr;   // [E, width]: V^k mod M_i, 0 beyond the table's order
  std::int32_t* tails_ = nullptr;    // [max_sequences, width], oldest first
  std::int32_t* lengths_ = nullptr;  // [max_sequences]
  unsigned* arrivals_ = nullptr;     // ngram_cache_view::arrivals
};

}  // namespace troupe
