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

/// The tokens sampled in one step, one per sequence, in plan order.
struct step_result {
  std::uint64_t step = 0;
  std::vector<seq_id> sequences;
  std::vector<std::int32_t> tokens;
};

/// A generation request as the scheduler receives it (the gateway fills it from JSON).
struct generate_request {
  std::string id;                     // the client's id, echoed in every event
  std::vector<std::int32_t> prompt;
  sampling_params sampling;
  std::int32_t max_tokens = 128;
  bool stop_on_eos = true;
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
};

/// The scheduler's counters, for /metrics.
struct scheduler_metrics {
  std::int64_t waiting = 0, running = 0;
  std::int64_t kv_blocks_used = 0, kv_blocks_total = 0;
  std::int64_t requests_finished = 0, requests_failed = 0, requests_rejected = 0, requests_cancelled = 0;
  std::int64_t prompt_tokens = 0, generated_tokens = 0, steps = 0;
  double mean_time_to_first_token_s = 0, mean_inter_token_s = 0;
};

}  // namespace troupe
