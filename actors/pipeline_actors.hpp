// The actors a step flows through: the n-gram embedding, the attention stages, the head.
// Each owns its share of per-sequence state (n-gram contexts; latent KV caches of its blocks;
// samplers) and delegates the step onward, so the scheduler sends one request per step and
// the head's reply (the sampled tokens) comes straight back to it.
#pragma once

#include <caf/fwd.hpp>

#include <chrono>

#include "actors/compute.hpp"
#include "protocol/interfaces.hpp"

namespace troupe {

/// Owns the base and n-gram tables' use and every live sequence's N-gram cache.
embedding_actor spawn_embedding(caf::actor_system& sys, shared_compute compute, stage_actor next);

struct stage_options {
  std::chrono::milliseconds timeout{300000};  // for its MoE requests
  std::int64_t kv_block_tokens = default_kv_block_tokens;
  std::int64_t kv_blocks = 4096;              // the KV budget in blocks (per layer of the stage)
};

/// Owns blocks [first_block, last_block): their attention, dense MLPs, norms and the paged
/// latent KV caches of their layers (a pool of kv_blocks blocks per layer). The MoE of each
/// block runs in the router (and expert shards) while this stage computes the rest of the
/// block, as the ScMoE shortcut allows.
stage_actor spawn_stage(caf::actor_system& sys, shared_compute compute, std::int64_t first_block, std::int64_t last_block,
                        router_actor router, stage_actor next, stage_options options);

/// The final norm, lm_head and sampling (one seeded sampler per sequence).
stage_actor spawn_head(caf::actor_system& sys, shared_compute compute);

}  // namespace troupe
