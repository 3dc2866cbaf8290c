// Builds the inference graph of a topology in an actor system: expert shards (local, or
// remote ones reached through CAF's middleman), the router, the attention stages back to
// front, the head, the embedding and the scheduler. The same actors run in every placement.
#pragma once

#include <caf/fwd.hpp>

#include <vector>

#include "actors/compute.hpp"
#include "graph/topology.hpp"
#include "protocol/interfaces.hpp"

namespace troupe {

struct inference_graph {
  scheduler_actor scheduler;
  embedding_actor embedding;
  std::vector<stage_actor> stages;  // attention stages, then the head
  router_actor router;
  std::vector<expert_shard_actor> shards;

  /// Spawns the graph; throws input_error when a remote shard cannot be reached.
  static inference_graph start(caf::actor_system& sys, shared_compute compute, const topology& topo);
  /// Stops every actor of the graph.
  void stop(caf::actor_system& sys);
};

/// Hosts expert shards for another process's graph: spawns the topology's shards named in
/// `shards` and publishes shard s on `port + i` (i = its index in `shards`) at `host`.
/// Returns the spawned actors (they live until the system stops).
std::vector<expert_shard_actor> host_expert_shards(caf::actor_system& sys, shared_compute compute, const topology& topo,
                                                   const std::vector<std::int64_t>& shards, const std::string& host,
                                                   std::uint16_t port);

}  // namespace troupe
