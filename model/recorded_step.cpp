// forward()'s decode path on a backend that records its ops (CUDA graphs). A decode step of T
// rows always runs the same ops on the same shapes; only token ids, positions and the cache's
// block addresses change. So the step is recorded once per T over fixed buffers (the embedded
// rows, positions, row-to-sequence map, one block table per attention layer) and every later
// step refills those buffers and replays: one launch instead of a host dispatch per op.
// The embedding stays outside the recording: it hashes n-grams on the host and gathers rows
// from tables that may stay in host memory.
#include <cstring>

#include "model/recorded_step.hpp"

namespace troupe {

tensor model::forward_recorded(const tensor& tokens, const step_layout& layout, std::span<const step_input> batch,
                               std::span<ngram_context* const> contexts) {
  const auto& c = config_;
  const std::int64_t t = layout.total_rows, block = plain_blocks_.block_tokens();
  const std::int64_t layers = c.num_attention_layers();
  const std::int64_t capacity = c.max_position_embeddings ? c.max_position_embeddings : default_recorded_keys;
  for (std::size_t i = 0; i < layout.num_sequences(); ++i)
    if (layout.first_position[i] + layout.num_rows[i] > capacity) return {};  // beyond the recorded scratch

  auto& slot = recorded_[t];
  if (!slot) {
    slot = std::make_unique<recorded_step>();
    slot->rows = t;
    slot->max_blocks = (capacity + block - 1) / block;
    slot->max_keys = slot->max_blocks * block;
    slot->h = be_.empty({t, c.hidden_size}, dtype::f32);
    slot->positions = be_.empty({t, 1}, dtype::i64);
    slot->row_seq = be_.empty({t, 1}, dtype::i32);
    slot->tables = be_.empty({layers * t, slot->max_blocks}, dtype::i64);
    slot->host_tables = tensor::zeros({layers * t, slot->max_blocks}, dtype::i64);
    be_.copy_rows(slot->host_tables, slot->tables, 0);
  }
  recorded_step& r = *slot;

  tensor tables = tensor::zeros({layers * t, r.max_blocks}, dtype::i64);
  for (std::int64_t a = 0; a < layers; ++a)
    for (std::size_t i = 0; i < batch.size(); ++i) {
      latent_cache& cache = batch[i].state->latents[static_cast<std::size_t>(a)];
      const std::int64_t need = claim_blocks(cache, layout.first_position[i], layout.num_rows[i], plain_blocks_);
      std::int64_t* row = tables.data<std::int64_t>() + (a * t + static_cast<std::int64_t>(i)) * r.max_blocks;
      for (std::int64_t b = 0; b < need; ++b) row[b] = reinterpret_cast<std::int64_t>(cache.blocks[static_cast<std::size_t>(b)].raw());
    }
  if (std::memcmp(tables.raw(), r.host_tables.raw(), tables.nbytes()) != 0) {
    be_.copy_rows(tables, r.tables, 0);
    r.host_tables = tables;
  }
  be_.copy_rows(embed(tokens, layout, contexts), r.h, 0);
  be_.copy_rows(layout.positions.reshape({t, 1}), r.positions, 0);
  be_.copy_rows(layout.row_seq.reshape({t, 1}), r.row_seq, 0);

  if (!r.recording.ops) {
    r.recording = be_.record([this, &r, block] {
      return head(blocks(r.h, [&r, block](std::int64_t a) {
        return paged_latents{r.tables.rows(a * r.rows, (a + 1) * r.rows), r.row_seq.reshape({r.rows}),
                             r.positions.reshape({r.rows}), block, r.max_keys, r.rows};
      }));
    });
  }
  r.recording.ops->replay();
  return be_.download(r.recording.out);
}

}  // namespace troupe
