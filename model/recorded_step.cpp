// forward()'s decode path on a backend that records its ops (CUDA graphs). A decode step of T
// rows always runs the same ops on the same shapes; only token ids, positions and the cache's
// block addresses change. So the step is recorded once per T over fixed buffers (the embedded
// rows, positions, row-to-sequence map, one block table per attention layer) and every later
// step refills those buffers and replays: one launch instead of a host dispatch per op.
// With the tables on the device the embedding is recorded too: with one token per sequence the
// device N-gram cache hashes the new tokens where the tables are (the host keeps its own copy of
// each context to re-seed a slot); with several (verification) the host hashes and uploads the
// ids. With tables in host memory the embedding runs before the replay (host hashing, rows
// gathered where the tables are).
#include <algorithm>
#include <cstring>

#include "model/recorded_step.hpp"

namespace troupe {

tensor model::forward_recorded(const tensor& tokens, const step_layout& layout, std::span<const step_input> batch,
                               std::span<ngram_context* const> contexts) {
  const auto& c = config_;
  const std::int64_t t = layout.total_rows, block = plain_blocks_.block_tokens();
  const std::int64_t layers = c.num_attention_layers();
  // Block tables hold as many blocks as the longest sequence needs, rounded up to a power of two
  // (at least 256 tokens, at most max_position_embeddings): a longer sequence records the step
  // again with twice the room, so a short context never copies or compares long tables.
  std::int64_t need = 0;
  for (std::size_t i = 0; i < layout.num_sequences(); ++i) need = std::max(need, layout.first_position[i] + layout.num_rows[i]);
  std::int64_t capacity = min_recorded_keys;
  while (capacity < need) capacity *= 2;
  if (c.max_position_embeddings) capacity = std::min(capacity, std::max(need, c.max_position_embeddings));

  // The embedding joins the recording when every table it reads is on the device (with host
  // tables only the host can gather). The device N-gram cache hashes when every sequence adds
  // one token (decode); a verification's several tokens per sequence are hashed on the host and
  // their ids go in with the tokens.
  bool embeds = weights_.embed.where() == be_.where();
  for (const auto& table : weights_.ngram_tables) embeds = embeds && table.where() == be_.where();
  const bool device_hash = embeds && hasher_.num_tables() && t == static_cast<std::int64_t>(layout.num_sequences());

  auto& slot = recorded_[3 * t + (embeds ? (device_hash ? 2 : 1) : 0)];
  if (slot && slot->max_keys < need) slot.reset();  // record again with room for the longest sequence
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
    slot->embeds = embeds;
    if (embeds) {
      slot->tokens = be_.empty({t, 1}, dtype::i32);
      slot->token_rows = be_.empty({t, 1}, dtype::i64);
      if (hasher_.num_tables()) slot->ngram_ids = be_.empty({hasher_.num_tables(), t}, dtype::i64);
      if (device_hash) {
        slot->ngram = be_.make_device_ngram(c, static_cast<int>(t));
        if (!slot->ngram) throw std::logic_error("a backend that records must provide a device N-gram cache");
        slot->slot_context.resize(static_cast<std::size_t>(t));
      }
    }
  }
  recorded_step& r = *slot;

  tensor tables = tensor::zeros({layers * t, r.max_blocks}, dtype::i64);
  for (std::int64_t a = 0; a < layers; ++a)
    for (std::size_t i = 0; i < batch.size(); ++i) {
      latent_cache& cache = batch[i].state->latents[static_cast<std::size_t>(a)];
      const std::int64_t need = claim_blocks(cache, layout.first_position[i], layout.num_rows[i], plain_blocks_);
      block_addresses(cache, need, tables.data<std::int64_t>() + (a * t + static_cast<std::int64_t>(i)) * r.max_blocks);
    }
  if (std::memcmp(tables.raw(), r.host_tables.raw(), tables.nbytes()) != 0) {
    be_.copy_rows(tables, r.tables, 0);
    r.host_tables = tables;
  }
  std::vector<ngram_context> before;  // each sequence's N-gram cache before this step's token
  if (r.embeds) {
    be_.copy_rows(tokens.reshape({t, 1}), r.tokens, 0);
    be_.copy_rows(token_ids(tokens).reshape({t, 1}), r.token_rows, 0);
    if (r.ngram) {
      for (std::size_t i = 0; i < batch.size(); ++i) {
        before.push_back(*contexts[i]);
        advance_ngram(*contexts[i], batch[i].tokens);  // the host's copy stays the reference
      }
    } else if (hasher_.num_tables()) {
      be_.copy_rows(hash_ngrams(tokens, layout, contexts), r.ngram_ids, 0);
    }
  } else {
    be_.copy_rows(embed(tokens, layout, contexts), r.h, 0);
  }
  be_.copy_rows(layout.positions.reshape({t, 1}), r.positions, 0);
  be_.copy_rows(layout.row_seq.reshape({t, 1}), r.row_seq, 0);

  if (!r.recording.ops) {
    r.recording = be_.record([this, &r, block] {
      tensor h = r.h;
      if (r.embeds) h = embed_on_device(r.ngram.get(), r.tokens.reshape({r.rows}), r.token_rows.reshape({r.rows}), r.ngram_ids);
      return head(blocks(h, [&r, block](std::int64_t a) {
        return paged_latents{r.tables.rows(a * r.rows, (a + 1) * r.rows), r.row_seq.reshape({r.rows}),
                             r.positions.reshape({r.rows}), block, r.max_keys,
                             std::min(r.rows, max_recorded_rows_per_sequence)};
      }));
    });
    // Recording ran the hash twice: what the slots hold is unknown now.
    for (auto& held : r.slot_context) held.tail.assign(1, -1);
  }
  // A slot whose context differs from its sequence's (another sequence took it, or a rollback
  // rewound it) is set from the host's copy; every other slot already holds it.
  if (r.ngram)
    for (std::size_t i = 0; i < batch.size(); ++i) {
      if (r.slot_context[i] != before[i]) r.ngram->set(static_cast<int>(i), before[i].tail);
      r.slot_context[i] = *contexts[i];
    }
  r.recording.ops->replay();
  return r.recording.out;  // overwritten by the next replay: the caller reads it first
}

}  // namespace troupe
