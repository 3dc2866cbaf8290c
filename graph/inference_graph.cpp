#include "graph/inference_graph.hpp"

#include <caf/actor_system.hpp>
#include <caf/io/middleman.hpp>
#include <caf/send.hpp>

#include "actors/draft_actor.hpp"
#include "actors/moe_actors.hpp"
#include "actors/pipeline_actors.hpp"
#include "actors/scheduler_actor.hpp"
#include "actors/supervisor.hpp"
#include "protocol/errors.hpp"

namespace troupe {

namespace {

// The current handle of every local actor, shared by the respawn/rewire closures (which all
// run in the supervisor, one at a time).
struct live_handles {
  draft_actor draft;  // invalid without speculation
  embedding_actor embedding;
  std::vector<stage_actor> stages;  // then the head
  router_actor router;
  std::vector<expert_shard_actor> shards;
  scheduler_actor scheduler;
};

}  // namespace

inference_graph inference_graph::start(caf::actor_system& sys, shared_compute compute, const topology& topo) {
  const auto& config = compute->net->config();
  auto live = std::make_shared<live_handles>();
  std::vector<supervised_actor> watched;
  std::vector<std::int64_t> shard_first;
  for (std::size_t s = 0; s < topo.shard_experts.size(); ++s) {
    const auto range = topo.shard_experts[s];
    shard_first.push_back(range.first);
    const auto remote = std::find_if(topo.remote_shards.begin(), topo.remote_shards.end(),
                                     [&](const remote_shard& r) { return r.shard == static_cast<std::int64_t>(s); });
    if (remote == topo.remote_shards.end()) {
      live->shards.push_back(spawn_expert_shard(sys, compute, range.first, range.second));
      watched.push_back({"expert shard " + std::to_string(s), caf::actor_cast<caf::actor>(live->shards.back()),
                         [&sys, compute, range] {
                           return caf::actor_cast<caf::actor>(spawn_expert_shard(sys, compute, range.first, range.second));
                         },
                         [live, s](const caf::actor& a) {
                           live->shards[s] = caf::actor_cast<expert_shard_actor>(a);
                           caf::anon_send(live->router, new_shard_atom::value, static_cast<std::int64_t>(s), a);
                         }});
      continue;
    }
    auto handle = sys.middleman().remote_actor<expert_shard_actor>(remote->host, remote->port);
    if (!handle)
      throw input_error("expert shard " + std::to_string(s) + " at " + remote->host + ":" + std::to_string(remote->port) +
                        " is unreachable: " + sys.render(handle.error()));
    live->shards.push_back(*handle);  // supervised by its own process
  }
  live->router = spawn_router(sys, compute, live->shards, shard_first, topo.timeout, topo.heartbeat);
  const auto num_stages = topo.stage_blocks.size();
  watched.push_back({"router", caf::actor_cast<caf::actor>(live->router),
                     [&sys, compute, live, shard_first, timeout = topo.timeout, heartbeat = topo.heartbeat] {
                       return caf::actor_cast<caf::actor>(
                           spawn_router(sys, compute, live->shards, shard_first, timeout, heartbeat));
                     },
                     [live, num_stages](const caf::actor& a) {
                       live->router = caf::actor_cast<router_actor>(a);
                       for (std::size_t k = 0; k < num_stages; ++k) caf::anon_send(live->stages[k], new_router_atom::value, a);
                     }});
  // Stages back to front, each knowing its successor; the head is last.
  stage_options stage_opts;
  stage_opts.timeout = topo.timeout;
  stage_opts.kv_block_tokens = topo.kv_block_tokens;
  stage_opts.kv_blocks = topo.kv_blocks;
  live->stages.resize(num_stages + 1);
  live->stages[num_stages] = spawn_head(sys, compute);
  for (std::size_t k = num_stages; k-- > 0;)
    live->stages[k] = spawn_stage(sys, compute, topo.stage_blocks[k].first, topo.stage_blocks[k].second, live->router,
                                  live->stages[k + 1], stage_opts);
  live->embedding = spawn_embedding(sys, compute, live->stages[0]);
  for (std::size_t k = 0; k <= num_stages; ++k) {
    const bool head = k == num_stages;
    const auto blocks = head ? std::pair<std::int64_t, std::int64_t>{} : topo.stage_blocks[k];
    watched.push_back(
        {head ? std::string("head") : "stage " + std::to_string(k) + " (blocks " + std::to_string(blocks.first) + "-" +
                                          std::to_string(blocks.second - 1) + ")",
         caf::actor_cast<caf::actor>(live->stages[k]),
         [&sys, compute, live, k, head, blocks, stage_opts] {
           return caf::actor_cast<caf::actor>(head ? spawn_head(sys, compute)
                                                   : spawn_stage(sys, compute, blocks.first, blocks.second, live->router,
                                                                 live->stages[k + 1], stage_opts));
         },
         [live, k](const caf::actor& a) {
           live->stages[k] = caf::actor_cast<stage_actor>(a);
           if (k == 0) caf::anon_send(live->embedding, new_next_atom::value, a);
           else caf::anon_send(live->stages[k - 1], new_next_atom::value, a);
         },
         true});
  }
  watched.push_back({"embedding", caf::actor_cast<caf::actor>(live->embedding),
                     [&sys, compute, live] { return caf::actor_cast<caf::actor>(spawn_embedding(sys, compute, live->stages[0])); },
                     [live](const caf::actor& a) {
                       live->embedding = caf::actor_cast<embedding_actor>(a);
                       if (live->draft) caf::anon_send(live->draft, new_next_atom::value, a);
                       else caf::anon_send(live->scheduler, new_entry_atom::value, a);
                     },
                     true});
  const auto& spec = topo.speculation;
  embedding_actor entry = live->embedding;
  if (!spec.draft.empty()) {
    draft_options opts;
    opts.draft_dir = spec.draft;
    opts.max_draft_tokens = spec.max_draft_tokens;
    live->draft = spawn_draft(sys, compute, opts, live->embedding);
    entry = live->draft;
    // A restarted draft actor starts over with the configured draft; sequences it has lost
    // stop drafting (their output is unaffected), so it holds no state a request needs.
    watched.push_back({"draft", caf::actor_cast<caf::actor>(live->draft),
                       [&sys, compute, live, opts] {
                         return caf::actor_cast<caf::actor>(spawn_draft(sys, compute, opts, live->embedding));
                       },
                       [live](const caf::actor& a) {
                         live->draft = caf::actor_cast<draft_actor>(a);
                         caf::anon_send(live->scheduler, new_entry_atom::value, a);
                       }});
  }
  scheduler_limits limits;
  limits.max_waiting = topo.max_waiting;
  limits.max_running = topo.max_running;
  limits.kv_block_tokens = topo.kv_block_tokens;
  limits.kv_blocks = topo.kv_blocks;
  limits.max_context = config.max_position_embeddings;
  limits.eos_token_id = config.eos_token_id;
  limits.step_timeout = topo.timeout;
  limits.micro_batches = topo.micro_batches ? topo.micro_batches : static_cast<std::int64_t>(num_stages);
  limits.speculative = !spec.draft.empty();
  limits.speculation = spec.policy;
  limits.max_draft_tokens = spec.max_draft_tokens;
  limits.speculation_max_batch = spec.policy.max_batch;
  live->scheduler = spawn_scheduler(sys, entry, limits);

  inference_graph g;
  g.scheduler = live->scheduler;
  g.draft = live->draft;
  g.embedding = live->embedding;
  g.stages = live->stages;
  g.router = live->router;
  g.shards = live->shards;
  for (const auto& w : watched) g.supervised_names.push_back(w.name);
  g.supervisor = spawn_supervisor(sys, std::move(watched), caf::actor_cast<caf::actor>(live->scheduler));
  return g;
}

void inference_graph::stop(caf::actor_system& sys) {
  (void)sys;
  if (supervisor) caf::anon_send_exit(supervisor, caf::exit_reason::user_shutdown);
  if (scheduler) caf::anon_send_exit(scheduler, caf::exit_reason::user_shutdown);
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
