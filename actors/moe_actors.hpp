// The MoE of the graph: a router that picks experts per row and expert-shard actors that each
// own a range of experts (of every block) and see only the rows routed to them. Zero
// (identity) experts are combined in the router and cost no message.
// Invariant: the router combines expert outputs in expert-id order, exactly as model::moe
// does, so the graph's MoE equals the single-process one bit for bit.
#pragma once

#include <caf/fwd.hpp>

#include <chrono>
#include <vector>

#include "actors/compute.hpp"
#include "protocol/interfaces.hpp"

namespace troupe {

/// Experts [first, last) of every block.
expert_shard_actor spawn_expert_shard(caf::actor_system& sys, shared_compute compute, std::int64_t first,
                                      std::int64_t last);

/// shard_first[s] is the first expert of shards[s]; shards cover [0, n_routed_experts) in order.
/// Shards in other processes get a heartbeat every `heartbeat`; one that misses it is down
/// until it answers again, and the MoE calls waiting on it fail at once.
router_actor spawn_router(caf::actor_system& sys, shared_compute compute, std::vector<expert_shard_actor> shards,
                          std::vector<std::int64_t> shard_first, std::chrono::milliseconds timeout,
                          std::chrono::milliseconds heartbeat);

}  // namespace troupe
