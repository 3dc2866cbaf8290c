// The paged latent KV cache of MLA: every attention layer of every sequence keeps its
// compressed latents (kv_lora + rope values per token) in fixed-size blocks from an allocator,
// so memory is claimed block by block and a KV budget is a number of blocks.
// Invariant: a cache's blocks hold its tokens in order; all blocks but the last are full.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "gpu/tensor.hpp"

namespace troupe {

class backend;

/// Tokens per KV block unless a topology says otherwise (the same everywhere, so the graph and
/// the plain forward pass attend over identically shaped blocks and agree bit for bit).
constexpr std::int64_t default_kv_block_tokens = 16;

/// Hands out blocks of [block_tokens, width] float32 rows on a backend.
class latent_block_allocator {
 public:
  /// `capacity_blocks` = 0: unbounded (blocks come from the backend as needed).
  latent_block_allocator(backend& be, std::int64_t block_tokens, std::int64_t width, std::int64_t capacity_blocks = 0);

  std::int64_t block_tokens() const { return block_tokens_; }
  std::int64_t blocks_in_use() const;
  /// A block; throws input_error when the capacity is exhausted (admission should prevent it).
  tensor allocate();
  /// Returns blocks for reuse.
  void release(std::vector<tensor>& blocks);

 private:
  backend& be_;
  std::int64_t block_tokens_, width_, capacity_;
  mutable std::mutex mutex_;
  std::vector<tensor> free_;
  std::int64_t in_use_ = 0;
};

/// One sequence's cache in one attention layer.
struct latent_cache {
  std::vector<tensor> blocks;  // each [block_tokens, kv_lora + rope]
};

}  // namespace troupe
