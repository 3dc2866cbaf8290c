// The draft actor: speculative decoding's first stage (spec: model.md section 8; issue 6).
// It owns a small draft model of the target's tokenizer and, for every live sequence, the
// draft's KV cache and the sequence's token history. For each step it drafts up to the
// plan's draft_tokens[i] tokens per sequence (batched over the sequences), appends them to
// the plan and hands it to the embedding; the head verifies them.
// Invariants: the draft only proposes, so nothing it does changes any output (the head's
// verification is lossless); a new draft takes over between two steps, catching up on each
// sequence's history, and the old one is freed once it is replaced; a draft that fails or has
// another vocabulary leaves serving on the current one.
#pragma once

#include <caf/fwd.hpp>

#include <memory>
#include <string>

#include "actors/compute.hpp"
#include "protocol/interfaces.hpp"

namespace troupe {

struct draft_options {
  std::string draft_dir;               // the first draft
  std::int64_t max_draft_tokens = 8;   // a step never drafts more per sequence (the KV reservation assumes it)
};

/// Loads `options.draft_dir` onto the target's backend (its tokenizer.json must equal the
/// target's, when both have one) (throws input_error when it cannot
/// draft for the target) and spawns the actor in front of `next`.
draft_actor spawn_draft(caf::actor_system& sys, shared_compute target, draft_options options, embedding_actor next);

}  // namespace troupe
