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
#include <numeric>

#include "model/recorded_step.hpp"

namespace troupe {

namespace {

// Uploads a recording's block tables where they changed (a block was claimed or the batch
// changed); the host copy says what the device holds.
void refresh_tables(backend& be, const tensor& tables, tensor& host_tables, tensor& device_tables) {
  if (std::memcmp(tables.raw(), host_tables.raw(), tables.nbytes()) == 0) return;
  be.copy_rows(tables, device_tables, 0);
  host_tables = tables;
}

}  // namespace

bool model::tables_on_device() const {
  bool on = weights_.embed.where() == be_.where();
  for (const auto& table : weights_.ngram_tables) on = on && table.where() == be_.where();
  return on;
}

std::int64_t model::recorded_keys(std::int64_t need) const {
  // Block tables hold as many blocks as the longest sequence needs, rounded up to a power of two
  // (at least 256 tokens, at most max_position_embeddings): a longer sequence records the step
  // again with twice the room, so a short context never copies or compares long tables.
  std::int64_t capacity = min_recorded_keys;
  while (capacity < need) capacity *= 2;
  if (config_.max_position_embeddings) capacity = std::min(capacity, std::max(need, config_.max_position_embeddings));
  return capacity;
}

tensor model::claim_tables(std::span<const step_input> batch, std::span<const std::int64_t> first,
                           std::span<const std::int64_t> rows, std::int64_t stride, std::int64_t max_blocks) {
  const std::int64_t layers = config_.num_attention_layers();
  tensor tables = tensor::zeros({layers * stride, max_blocks}, dtype::i64);
  for (std::int64_t a = 0; a < layers; ++a)
    for (std::size_t i = 0; i < batch.size(); ++i) {
      latent_cache& cache = batch[i].state->latents[static_cast<std::size_t>(a)];
      const std::int64_t need = claim_blocks(cache, first[i], rows[i], plain_blocks_);
      block_addresses(cache, need, tables.data<std::int64_t>() + (a * stride + static_cast<std::int64_t>(i)) * max_blocks);
    }
  return tables;
}

tensor model::forward_recorded(const tensor& tokens, const step_layout& layout, std::span<const step_input> batch,
                               std::span<ngram_context* const> contexts) {
  const auto& c = config_;
  const std::int64_t t = layout.total_rows, block = plain_blocks_.block_tokens();
  const std::int64_t layers = c.num_attention_layers();
  std::int64_t need = 0;
  for (std::size_t i = 0; i < layout.num_sequences(); ++i) need = std::max(need, layout.first_position[i] + layout.num_rows[i]);
  const std::int64_t capacity = recorded_keys(need);

  // The embedding joins the recording when every table it reads is on the device (with host
  // tables only the host can gather). The device N-gram cache hashes when every sequence adds
  // one token (decode); a verification's several tokens per sequence are hashed on the host and
  // their ids go in with the tokens.
  const bool embeds = tables_on_device();
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

  refresh_tables(be_, claim_tables(batch, layout.first_position, layout.num_rows, t, r.max_blocks), r.host_tables, r.tables);
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

// Greedy drafting in one replay. The first step embeds each sequence's fed tokens (their n-gram
// ids hashed on the host, as a verification's are), runs the blocks, and scores only each
// sequence's last row; every later step embeds the argmax before it straight from the device
// (hashed there by the device N-gram cache) at the next position. The block tables are claimed
// for all the steps' tokens before the replay, so one table serves every step.
std::vector<std::vector<std::int32_t>> model::draft_recorded(std::span<const step_input> batch, std::int64_t steps) {
  const auto& c = config_;
  const auto n = static_cast<std::int64_t>(batch.size());
  const std::int64_t block = plain_blocks_.block_tokens(), layers = c.num_attention_layers();
  std::vector<std::int64_t> num_rows, first, span_rows;
  std::vector<ngram_context*> contexts;
  std::int64_t need = 0;
  for (const auto& in : batch) {
    num_rows.push_back(static_cast<std::int64_t>(in.tokens.size()));
    first.push_back(in.state->num_tokens);
    span_rows.push_back(num_rows.back() + steps - 1);  // the fed tokens and every pick but the last
    check_room(*in.state, span_rows.back());
    need = std::max(need, first.back() + span_rows.back());
    contexts.push_back(&in.state->ngram);
    if (in.state->latents.empty()) in.state->latents.resize(static_cast<std::size_t>(layers));
  }
  const step_layout layout = step_layout::make(num_rows, first);
  const std::int64_t t = layout.total_rows;

  auto& slot = recorded_drafts_[{t, n, steps}];
  if (slot && slot->max_keys < need) slot.reset();  // record again with room for the longest sequence
  if (!slot) {
    slot = std::make_unique<recorded_draft>();
    auto& r = *slot;
    r.rows = t, r.sequences = n, r.steps = steps;
    r.max_blocks = (recorded_keys(need) + block - 1) / block;
    r.max_keys = r.max_blocks * block;
    r.tokens = be_.empty({t, 1}, dtype::i32);
    r.token_rows = be_.empty({t, 1}, dtype::i64);
    r.positions = be_.empty({t, 1}, dtype::i64);
    r.row_seq = be_.empty({t, 1}, dtype::i32);
    r.last_rows = be_.empty({n, 1}, dtype::i64);
    r.later_positions = be_.empty({(steps - 1) * n, 1}, dtype::i64);
    tensor sequence_ids = tensor::empty({n, 1}, dtype::i32);
    std::iota(sequence_ids.data<std::int32_t>(), sequence_ids.data<std::int32_t>() + n, 0);
    r.later_row_seq = be_.upload(sequence_ids, dtype::i32);
    if (hasher_.num_tables()) {
      r.ngram_ids = be_.empty({hasher_.num_tables(), t}, dtype::i64);
      r.later_ngram_ids = be_.empty({hasher_.num_tables(), n}, dtype::i64);
      r.picks32 = be_.empty({steps, n}, dtype::i32);
      r.ngram = be_.make_device_ngram(c, static_cast<int>(n));
      if (!r.ngram) throw std::logic_error("a backend that records must provide a device N-gram cache");
      r.slot_context.resize(static_cast<std::size_t>(n));
    }
    r.tables = be_.empty({layers * n, r.max_blocks}, dtype::i64);
    r.host_tables = tensor::zeros({layers * n, r.max_blocks}, dtype::i64);
    be_.copy_rows(r.host_tables, r.tables, 0);
  }
  recorded_draft& r = *slot;

  refresh_tables(be_, claim_tables(batch, first, span_rows, n, r.max_blocks), r.host_tables, r.tables);
  tensor tokens = tensor::empty({t}, dtype::i32);
  for (std::size_t i = 0; i < batch.size(); ++i)
    std::copy(batch[i].tokens.begin(), batch[i].tokens.end(), tokens.data<std::int32_t>() + layout.row_begin[i]);
  be_.copy_rows(tokens.reshape({t, 1}), r.tokens, 0);
  be_.copy_rows(token_ids(tokens).reshape({t, 1}), r.token_rows, 0);
  if (hasher_.num_tables()) be_.copy_rows(hash_ngrams(tokens, layout, contexts), r.ngram_ids, 0);  // contexts move past the feed
  be_.copy_rows(layout.positions.reshape({t, 1}), r.positions, 0);
  be_.copy_rows(layout.row_seq.reshape({t, 1}), r.row_seq, 0);
  tensor last = tensor::empty({n, 1}, dtype::i64), later = tensor::empty({(steps - 1) * n, 1}, dtype::i64);
  const auto last_rows = layout.last_rows();
  std::copy(last_rows.begin(), last_rows.end(), last.data<std::int64_t>());
  for (std::int64_t j = 1; j < steps; ++j)
    for (std::int64_t i = 0; i < n; ++i) later.data<std::int64_t>()[(j - 1) * n + i] = first[i] + num_rows[i] + j - 1;
  be_.copy_rows(last, r.last_rows, 0);
  be_.copy_rows(later, r.later_positions, 0);  // draft_greedy replays only chains of 2+ steps

  if (!r.recording.ops) {
    r.recording = be_.record([this, &r, block] {
      const std::int64_t n = r.sequences, a_rows = r.rows;
      auto pages = [&](const tensor& row_seq, const tensor& positions, std::int64_t rows, std::int64_t per_sequence) {
        return [&r, &row_seq, &positions, rows, per_sequence, block, n](std::int64_t a) {
          return paged_latents{r.tables.rows(a * n, (a + 1) * n), row_seq.reshape({rows}), positions.reshape({rows}), block,
                               r.max_keys, per_sequence};
        };
      };
      tensor picks = be_.empty({r.steps, n}, dtype::i64);
      auto pick = [&](const tensor& h, std::int64_t j) {
        const tensor logits = head(h);
        tensor ids = picks.rows(j, j + 1).reshape({n});
        be_.argmax(logits, ids);
        if (r.ngram) {
          tensor narrow = r.picks32.rows(j, j + 1).reshape({n});
          be_.argmax(logits, narrow);
        }
      };
      tensor h = blocks(embed_on_device(nullptr, r.tokens.reshape({a_rows}), r.token_rows.reshape({a_rows}), r.ngram_ids),
                        pages(r.row_seq, r.positions, a_rows, std::min(a_rows, max_recorded_rows_per_sequence)));
      tensor last = be_.empty({n, h.dim(1)}, dtype::f32);
      be_.gather_rows(h, r.last_rows.reshape({n}), last);
      pick(last, 0);
      for (std::int64_t j = 1; j < r.steps; ++j) {
        const tensor fed = (r.ngram ? r.picks32 : picks).rows(j - 1, j).reshape({n});
        const tensor x = embed_on_device(r.ngram.get(), fed, picks.rows(j - 1, j).reshape({n}), r.later_ngram_ids);
        const tensor positions = r.later_positions.rows((j - 1) * n, j * n);
        pick(blocks(x, pages(r.later_row_seq, positions, n, 1)), j);
      }
      return picks;
    });
    for (auto& held : r.slot_context) held.tail.assign(1, -1);  // recording ran the hash twice
  }
  // Each slot must hold its sequence's context after the feed (the host's copy has just moved past it).
  if (r.ngram)
    for (std::size_t i = 0; i < batch.size(); ++i)
      if (r.slot_context[i] != *contexts[i]) r.ngram->set(static_cast<int>(i), contexts[i]->tail);
  r.recording.ops->replay();
  const tensor picked = be_.download(r.recording.out);
  std::vector<std::vector<std::int32_t>> out(batch.size());
  for (std::size_t i = 0; i < batch.size(); ++i) {
    for (std::int64_t j = 0; j < steps; ++j)
      out[i].push_back(static_cast<std::int32_t>(picked.data<std::int64_t>()[j * n + static_cast<std::int64_t>(i)]));
    sequence_state& state = *batch[i].state;
    state.num_tokens += span_rows[i];
    advance_ngram(state.ngram, std::span(out[i]).first(static_cast<std::size_t>(steps - 1)));
    if (r.ngram) r.slot_context[i] = state.ngram;
  }
  return out;
}

}  // namespace troupe
