// The shape of an inference graph, from a topology file (configs/topologies/*.json): how
// many attention stages and which blocks each owns, how many expert shards, which shards run
// in another process (and where), and the scheduler's limits. Plain data; validated against
// the model config with errors that name the field.
#pragma once

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "model/latent_cache.hpp"
#include "model/speculation_policy.hpp"

namespace troupe {

struct model_config;

struct remote_shard {
  std::int64_t shard = 0;
  std::string host;
  std::uint16_t port = 0;
};

/// Speculative decoding in the graph: a draft actor in front of the embedding.
struct speculation_setup {
  std::string draft;                  // draft model directory; empty: no speculation
  speculation_config policy;          // k (draft_tokens) and when to switch off and retry
  std::int64_t max_draft_tokens = 8;  // the most a request may ask for
};

struct topology {
  std::string name = "local";
  std::vector<std::pair<std::int64_t, std::int64_t>> stage_blocks;   // [first, last) per stage
  std::vector<std::pair<std::int64_t, std::int64_t>> shard_experts;  // [first, last) per shard
  std::vector<remote_shard> remote_shards;
  int threads = 0;
  // scheduler limits
  std::int64_t max_waiting = 256, max_running = 64, kv_block_tokens = default_kv_block_tokens, kv_blocks = 4096;
  std::int64_t micro_batches = 0;  // steps in flight; 0: one per attention stage
  std::chrono::milliseconds timeout{300000};
  std::chrono::milliseconds heartbeat{1000};  // remote peers must answer within this, checked this often
  speculation_setup speculation;
};

/// Throws input_error naming the first bad setting.
void validate_speculation(const speculation_setup& s);
/// Parses and validates a topology for a model; `source` names the file in errors.
topology parse_topology(std::string_view json, const std::string& source, const model_config& config);
topology load_topology(const std::filesystem::path& path, const model_config& config);
/// The embedded default: one stage, one expert shard, all in this process.
topology local_topology(const model_config& config);

}  // namespace troupe
