// The messages of the inference graph, as plain data (no CAF here; protocol/interfaces.hpp
// names the actors that exchange them, protocol/serialization.hpp makes them serializable).
// Invariant: a step's layout (sequences, positions, row counts) travels with its tensors, so
// every stage can act on a message alone; tensors inside a process are shared, not copied.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "gpu/tensor.hpp"
#include "model/sampler.hpp"

namespace troupe {

using seq_id = std::uint64_t;

/// What one step computes, planned by the scheduler. Sequence i adds num_tokens[i] tokens
/// (a prompt at first, then one sampled token per step) starting at position first_position[i].
struct step_plan {
  std::uint64_t step = 0;
  std::vector<seq_id> sequences;
  std::vector<std::int64_t> first_position;
  std::vector<std::int64_t> num_tokens;
  std::vector<std::int32_t> tokens;         // all sequences' new tokens, concatenated
  std::vector<sampling_params> sampling;    // per sequence (the head keeps the generator state)
  // Speculation. From the scheduler, draft_tokens[i] is how many tokens sequence i may draft
  // (empty: none may); the draft actor appends the drafts to the sequence's tokens and sets
  // draft_tokens[i] to how many of its num_tokens[i] tokens (the last ones) are drafts.
  std::vector<std::int64_t> draft_tokens;
  tensor draft_probs;       // f32 [drafts of sampled sequences, V]: the draft's distributions q, in order
  std::string draft_model;  // the draft that proposed them (for per-draft metrics)
  // The MTP draft drafts from the target's hidden states: it sets want_hidden, and the next
  // plan carries, per sequence, the target's hidden states (before the final norm) at
  // positions [first_position[i] - hidden_rows[i], first_position[i]).
  bool want_hidden = false;
  std::vector<std::int64_t> hidden_rows;
  tensor target_hidden;  // f32 [sum of hidden_rows, H]
};

/// A step's hidden states on their way through the stages: rows in plan order.
struct hidden_batch {
  step_plan plan;
  tensor hidden;  // f32 [total new tokens, H]
};

/// Rows of one MoE block for one expert shard: rows for experts[0] first, then experts[1], ...
struct expert_batch {
  std::int32_t block = 0;
  std::vector<std::int32_t> experts;  // global expert ids, all in the shard
  std::vector<std::int64_t> counts;   // rows per expert
  tensor x;                           // f32 [sum(counts), H]
};

/// The tokens one step produced, in plan order: sequence i gets accepted[i] of its drafts
/// followed by one token sampled by the target, so 1 + accepted[i] tokens (concatenated).
struct step_result {
  std::uint64_t step = 0;
  std::vector<seq_id> sequences;
  std::vector<std::int32_t> tokens;
  std::vector<std::int64_t> drafted, accepted;  // per sequence: drafts verified, drafts kept
  std::string draft_model;
  // When the plan wanted them: per sequence, the target's hidden states of the positions this
  // step settled (its own tokens and the accepted drafts), concatenated.
  std::vector<std::int64_t> hidden_rows;
  tensor hidden;
};

/// A generation request as the scheduler receives it (the gateway fills it from JSON).
struct generate_request {
  std::string id;                     // the client's id, echoed in every event
  std::vector<std::int32_t> prompt;
  sampling_params sampling;
  std::int32_t max_tokens = 128;
  bool stop_on_eos = true;
  std::int32_t draft_tokens = -1;     // speculation: tokens drafted per step (-1: the server's default, 0: none)
};

/// Why a request ended.
enum class request_end : std::uint8_t { eos, length, cancelled, error };
const char* to_string(request_end e);

/// The final event of a request.
struct request_done {
  std::string id;
  request_end reason = request_end::length;
  std::string error;  // set when reason == error: what failed, in which actor
  std::int64_t prompt_tokens = 0, completion_tokens = 0;
  double time_to_first_token_s = 0, total_s = 0;
  std::int64_t draft_rounds = 0, drafted_tokens = 0, accepted_tokens = 0;  // speculation (0 without)
};

/// What one draft model's proposals achieved (for /metrics): a round is one verification of
/// one sequence's drafts.
struct draft_metrics {
  std::string draft;
  std::int64_t rounds = 0, drafted = 0, accepted = 0;
};

/// The scheduler's counters, for /metrics.
struct scheduler_metrics {
  std::int64_t waiting = 0, running = 0;
  std::int64_t kv_blocks_used = 0, kv_blocks_total = 0;
  std::int64_t requests_finished = 0, requests_failed = 0, requests_rejected = 0, requests_cancelled = 0;
  std::int64_t prompt_tokens = 0, generated_tokens = 0, steps = 0;
  double mean_time_to_first_token_s = 0, mean_inter_token_s = 0;
  std::int64_t speculation_off_switches = 0;  // times a sequence's speculation was switched off
  std::vector<draft_metrics> drafts;          // per draft model that has served
};

}  // namespace troupe
