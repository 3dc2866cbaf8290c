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

/// The handles of a running graph as spawned; after a restart the supervisor holds the new
/// ones (ask it with metrics_atom for the restart counts, in `supervised_names` order).
struct inference_graph {
  scheduler_actor scheduler;
  draft_actor draft;                // the entry when the topology speculates, else invalid
  embedding_actor embedding;
  std::vector<stage_actor> stages;  // attention stages, then the head
  router_actor router;
  std::vector<expert_shard_actor> shards;
  caf::actor supervisor;
  std::vector<std::string> supervised_names;

  /// Spawns the graph; throws input_error when a remote shard cannot be reached or the
  /// topology's draft cannot draft for the model.
  static inference_graph start(caf::actor_system& sys, shared_compute compute, const topology& topo);
  /// Stops every actor of the graph (the supervisor stops those it watches).
  void stop(caf::actor_system& sys);
};

/// Hosts expert shards for another process's graph: spawns the topology's shards named in
/// `shards` and publishes shard s on `port + i` (i = its index in `shards`) at `host`.
/// Returns the spawned actors (they live until the system stops).
std::vector<expert_shard_actor> host_expert_shards(caf::actor_system& sys, shared_compute compute, const topology& topo,
                                                   const std::vector<std::int64_t>& shards, const std::string& host,
                                                   std::uint16_t port);

}  // namespace troupe
