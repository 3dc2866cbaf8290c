// The scheduler: continuous batching over the graph. Requests wait in a bounded queue, are
// admitted at step boundaries while the KV-cache budget (paged blocks) allows, join the
// running batch with their whole prompt, then add one token per step; finished, cancelled and
// failed ones leave at step boundaries and every stateful actor is told to free them.
// Up to `micro_batches` steps are in flight, each with its own share of the running sequences,
// so S pipeline stages work on S micro-batches at once.
// With speculation a step may return several tokens per sequence (accepted drafts, then the
// target's own); the scheduler emits them in order and stops at EOS or max_tokens.
// Invariant: a sequence is in at most one step in flight, and a request's tokens reach its
// subscriber in order, followed by exactly one done event.
#pragma once

#include <caf/fwd.hpp>

#include <chrono>
#include <vector>

#include "model/speculation_policy.hpp"
#include "protocol/interfaces.hpp"

namespace troupe {

struct scheduler_limits {
  std::int64_t max_waiting = 256;        // queued requests beyond this are refused
  std::int64_t max_running = 64;         // sequences in one step at most
  std::int64_t kv_block_tokens = 16;     // tokens per KV block
  std::int64_t kv_blocks = 4096;         // the KV budget, in blocks
  std::int64_t max_context = 0;          // prompt + max_tokens limit (0: none)
  std::int32_t eos_token_id = 2;
  std::int64_t micro_batches = 1;        // steps in flight at once (one per pipeline stage keeps all busy)
  std::chrono::milliseconds step_timeout{300000};
  // Speculative decoding (the entry is a draft actor): each request drafts up to
  // speculation.draft_tokens (or its own draft_tokens, at most max_draft_tokens) per step
  // while its policy keeps speculation on and the step has at most speculation_max_batch
  // sequences (0: no cutoff); beyond that verification costs more than drafting saves.
  bool speculative = false;
  speculation_config speculation;
  std::int64_t max_draft_tokens = 8;
  std::int64_t speculation_max_batch = 0;
};

/// `entry` runs a step through the graph; finished sequences are freed by a free_atom message
/// to it, which every stage passes on to its successor.
scheduler_actor spawn_scheduler(caf::actor_system& sys, embedding_actor entry, scheduler_limits limits);

}  // namespace troupe
