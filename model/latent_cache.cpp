#include "model/latent_cache.hpp"

#include "gpu/backend.hpp"
#include "protocol/errors.hpp"

namespace troupe {

latent_block_allocator::latent_block_allocator(backend& be, std::int64_t block_tokens, std::int64_t width,
                                               std::int64_t capacity_blocks)
    : be_(be), block_tokens_(block_tokens), width_(width), capacity_(capacity_blocks) {
  if (block_tokens < 1) throw input_error("the KV block size must be at least one token");
}

std::int64_t latent_block_allocator::blocks_in_use() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return in_use_;
}

tensor latent_block_allocator::allocate() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (capacity_ && in_use_ >= capacity_)
    throw input_error("the KV cache is full (" + std::to_string(capacity_) + " blocks of " + std::to_string(block_tokens_) +
                      " tokens)");
  ++in_use_;
  if (!free_.empty()) {
    tensor t = std::move(free_.back());
    free_.pop_back();
    return t;
  }
  return be_.empty({block_tokens_, width_}, dtype::f32);
}

void latent_block_allocator::release(std::vector<tensor>& blocks) {
  std::lock_guard<std::mutex> lock(mutex_);
  in_use_ -= static_cast<std::int64_t>(blocks.size());
  for (auto& b : blocks) free_.push_back(std::move(b));
  blocks.clear();
}

}  // namespace troupe
