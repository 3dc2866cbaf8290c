#include "graph/inference_graph.hpp"

#include <caf/actor_system.hpp>
#include <caf/io/middleman.hpp>
#include <caf/send.hpp>

#include "actors/moe_actors.hpp"
#include "actors/pipeline_actors.hpp"
#include "actors/scheduler_actor.hpp"
#include "protocol/errors.hpp"

namespace troupe {

inference_graph inference_graph::start(caf::actor_system& sys, shared_compute compute, const topology& topo) {
  const auto& config = compute->net->config();
  inference_graph g;
  std::vector<std::int64_t> shard_first;
  for (std::size_t s = 0; s < topo.shard_experts.size(); ++s) {
    shard_first.push_back(topo.shard_experts[s].first);
    const auto remote = std::find_if(topo.remote_shards.begin(), topo.remote_shards.end(),
                                     [&](const remote_shard& r) { return r.shard == static_cast<std::int64_t>(s); });
    if (remote == topo.remote_shards.end()) {
      g.shards.push_back(spawn_expert_shard(sys, compute, topo.shard_experts[s].first, topo.shard_experts[s].second));
      continue;
    }
    auto handle = sys.middleman().remote_actor<expert_shard_actor>(remote->host, remote->port);
    if (!handle)
      throw input_error("expert shard " + std::to_string(s) + " at " + remote->host + ":" + std::to_string(remote->port) +
                        " is unreachable: " + sys.render(handle.error()));
    g.shards.push_back(*handle);
  }
  g.router = spawn_router(sys, compute, g.shards, shard_first, topo.timeout);
  stage_actor next = spawn_head(sys, compute);
  g.stages.push_back(next);
  for (auto it = topo.stage_blocks.rbegin(); it != topo.stage_blocks.rend(); ++it) {
    next = spawn_stage(sys, compute, it->first, it->second, g.router, next, topo.timeout);
    g.stages.insert(g.stages.begin(), next);
  }
  g.embedding = spawn_embedding(sys, compute, next);
  std::vector<caf::actor> stateful = {caf::actor_cast<caf::actor>(g.embedding)};
  for (const auto& s : g.stages) stateful.push_back(caf::actor_cast<caf::actor>(s));
  scheduler_limits limits;
  limits.max_waiting = topo.max_waiting;
  limits.max_running = topo.max_running;
  limits.kv_block_tokens = topo.kv_block_tokens;
  limits.kv_blocks = topo.kv_blocks;
  limits.max_context = config.max_position_embeddings;
  limits.eos_token_id = config.eos_token_id;
  limits.step_timeout = topo.timeout;
  g.scheduler = spawn_scheduler(sys, g.embedding, std::move(stateful), limits);
  return g;
}

void inference_graph::stop(caf::actor_system& sys) {
  (void)sys;
  auto kill = [](const auto& a) {
    if (a) caf::anon_send_exit(a, caf::exit_reason::user_shutdown);
  };
  kill(scheduler);
  kill(embedding);
  for (const auto& s : stages) kill(s);
  kill(router);
  for (const auto& s : shards)
    if (s && s.node() == scheduler.node()) kill(s);  // remote shards belong to their own process
}

std::vector<expert_shard_actor> host_expert_shards(caf::actor_system& sys, shared_compute compute, const topology& topo,
                                                   const std::vector<std::int64_t>& shards, const std::string& host,
                                                   std::uint16_t port) {
  std::vector<expert_shard_actor> out;
  for (std::size_t i = 0; i < shards.size(); ++i) {
    const auto s = shards[i];
    if (s < 0 || s >= static_cast<std::int64_t>(topo.shard_experts.size()))
      throw input_error("expert shard " + std::to_string(s) + " is not in the topology (" +
                        std::to_string(topo.shard_experts.size()) + " shards)");
    const auto& range = topo.shard_experts[static_cast<std::size_t>(s)];
    auto shard = spawn_expert_shard(sys, compute, range.first, range.second);
    const auto wanted = static_cast<std::uint16_t>(port + i);
    auto published = sys.middleman().publish(shard, wanted, host.c_str(), true);
    if (!published) throw input_error("cannot publish expert shard " + std::to_string(s) + " on " + host + ":" +
                                      std::to_string(wanted) + ": " + sys.render(published.error()));
    out.push_back(shard);
  }
  return out;
}

}  // namespace troupe
