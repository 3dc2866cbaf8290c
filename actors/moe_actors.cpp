#include "actors/moe_actors.hpp"

#include <caf/actor_system.hpp>
#include <caf/stateful_actor.hpp>
#include <caf/typed_event_based_actor.hpp>

#include <algorithm>
#include <cstring>
#include <iostream>

namespace troupe {
namespace {

struct shard_state {
  shard_state() = default;  // not an aggregate: CAF would otherwise initialise the first member from the actor pointer
  shared_compute compute;
  std::int64_t first = 0, last = 0;
  static inline const char* name = "troupe.experts";
};

expert_shard_actor::behavior_type shard_impl(expert_shard_actor::stateful_pointer<shard_state> self,
                                             shared_compute compute, std::int64_t first, std::int64_t last) {
  self->state.compute = std::move(compute);
  self->state.first = first;
  self->state.last = last;
  return {
      [=](experts_atom, expert_batch& b) -> caf::result<tensor> {
        auto& st = self->state;
        try {
          if (b.experts.size() != b.counts.size()) throw std::invalid_argument("experts and counts differ in length");
          model& net = *st.compute->net;
          tensor y = st.compute->be->empty(b.x.shape(), dtype::f32);
          std::int64_t offset = 0;
          for (std::size_t i = 0; i < b.experts.size(); ++i) {
            const std::int64_t e = b.experts[i], n = b.counts[i];
            if (e < st.first || e >= st.last)
              throw std::invalid_argument("expert " + std::to_string(e) + " is not in this shard [" +
                                          std::to_string(st.first) + ", " + std::to_string(st.last) + ")");
            const tensor out = net.expert_forward(b.block, e, b.x.rows(offset, offset + n));
            st.compute->be->copy_rows(out, y, offset);
            offset += n;
          }
          return y;
        } catch (const std::exception& e) {
          return caf::make_error(caf::sec::runtime_error, std::string("expert shard: ") + e.what());
        }
      },
      [=](heartbeat_atom) { return self->state.first; },
  };
}

struct moe_job;

struct router_state {
  router_state() = default;  // not an aggregate: CAF would otherwise initialise the first member from the actor pointer
  shared_compute compute;
  std::vector<expert_shard_actor> shards;
  std::vector<std::int64_t> shard_first;
  std::chrono::milliseconds timeout{0};
  std::chrono::milliseconds heartbeat{0};
  std::vector<std::string> down;  // per shard: why it is considered down ("" = healthy)
  std::vector<std::weak_ptr<moe_job>> jobs;  // MoE calls in flight, failed at once if a shard they wait on goes down
  static inline const char* name = "troupe.router";
};

// One MoE call in flight: the routing, each shard's reply, how many are still out.
struct moe_job {
  std::int32_t block = 0;
  tensor u;
  moe_routing routing;
  std::vector<tensor> replies;                  // per shard
  std::vector<std::vector<std::int64_t>> offsets;  // per shard: row offset of each of its experts
  std::size_t pending = 0;
  bool failed = false;
  std::vector<bool> waiting;  // per shard: a reply is still out
  caf::typed_response_promise<tensor> rp;
};

// A shard stopped answering: fail every MoE call waiting on it rather than at the step timeout.
void fail_jobs_waiting_on(router_state& st, std::size_t shard, const std::string& why) {
  for (auto& weak : st.jobs)
    if (auto job = weak.lock(); job && !job->failed && job->waiting[shard]) {
      job->failed = true;
      job->rp.deliver(caf::make_error(caf::sec::runtime_error, why));
    }
  st.jobs.erase(std::remove_if(st.jobs.begin(), st.jobs.end(), [](const auto& w) { return w.expired(); }), st.jobs.end());
}

std::size_t shard_of(const router_state& st, std::int64_t expert) {
  std::size_t s = 0;
  while (s + 1 < st.shard_first.size() && st.shard_first[s + 1] <= expert) ++s;
  return s;
}

tensor combine_all(router_state& st, moe_job& job) {
  model& net = *st.compute->net;
  const auto& c = net.config();
  tensor out = st.compute->be->empty({job.u.dim(0), c.hidden_size}, dtype::f32);
  st.compute->be->zero(out);
  for (std::int64_t e = 0; e < c.num_router_experts(); ++e) {  // expert order, as model::moe
    const auto& rows = job.routing.rows[static_cast<std::size_t>(e)];
    if (rows.empty()) continue;
    if (e >= c.n_routed_experts) {
      net.combine(job.routing, e, net.gather(job.u, rows), out);
      continue;
    }
    const std::size_t s = shard_of(st, e);
    const std::int64_t begin = job.offsets[s][static_cast<std::size_t>(e - st.shard_first[s])];
    net.combine(job.routing, e, job.replies[s].rows(begin, begin + static_cast<std::int64_t>(rows.size())), out);
  }
  return out;
}

router_actor::behavior_type router_impl(router_actor::stateful_pointer<router_state> self, shared_compute compute,
                                        std::vector<expert_shard_actor> shards, std::vector<std::int64_t> shard_first,
                                        std::chrono::milliseconds timeout, std::chrono::milliseconds heartbeat) {
  auto& st = self->state;
  st.compute = std::move(compute);
  st.shards = std::move(shards);
  st.shard_first = std::move(shard_first);
  st.timeout = timeout;
  st.heartbeat = heartbeat;
  st.down.assign(st.shards.size(), std::string());
  // Remote shards are watched with heartbeats as well as the transport: a frozen peer keeps its
  // connection open and would otherwise hold requests until the step timeout.
  const bool any_remote = std::any_of(st.shards.begin(), st.shards.end(),
                                      [&](const auto& s) { return s.node() != self->node(); });
  if (any_remote && heartbeat.count() > 0) self->send(self, heartbeat_atom::value);
  return {
      [=](moe_atom, std::int32_t block, tensor& u) -> caf::result<tensor> {
        auto& st = self->state;
        auto job = std::make_shared<moe_job>();
        job->block = block;
        job->u = u;
        std::vector<expert_batch> batches(st.shards.size());
        try {
          model& net = *st.compute->net;
          const auto& c = net.config();
          job->routing = net.route(block, u);
          job->replies.resize(st.shards.size());
          job->offsets.resize(st.shards.size());
          for (std::size_t s = 0; s < st.shards.size(); ++s) {
            const std::int64_t end = s + 1 < st.shards.size() ? st.shard_first[s + 1] : c.n_routed_experts;
            std::vector<std::int32_t> rows;
            std::int64_t offset = 0;
            for (std::int64_t e = st.shard_first[s]; e < end; ++e) {
              const auto& er = job->routing.rows[static_cast<std::size_t>(e)];
              job->offsets[s].push_back(offset);
              if (er.empty()) continue;
              batches[s].experts.push_back(static_cast<std::int32_t>(e));
              batches[s].counts.push_back(static_cast<std::int64_t>(er.size()));
              rows.insert(rows.end(), er.begin(), er.end());
              offset += static_cast<std::int64_t>(er.size());
            }
            if (rows.empty()) continue;  // a shard with no rows gets no message
            batches[s].block = block;
            batches[s].x = net.gather(u, rows);
            ++job->pending;
          }
          if (job->pending == 0) return combine_all(st, *job);
        } catch (const std::exception& e) {
          return caf::make_error(caf::sec::runtime_error, "router block " + std::to_string(block) + ": " + e.what());
        }
        job->waiting.assign(st.shards.size(), false);
        for (std::size_t s = 0; s < batches.size(); ++s) {
          if (batches[s].experts.empty()) continue;
          if (!st.down[s].empty()) return caf::make_error(caf::sec::runtime_error, st.down[s]);
          job->waiting[s] = true;
        }
        auto rp = self->make_response_promise<tensor>();
        job->rp = rp;
        st.jobs.push_back(job);
        for (std::size_t s = 0; s < batches.size(); ++s) {
          if (batches[s].experts.empty()) continue;
          self->request(st.shards[s], st.timeout, experts_atom::value, std::move(batches[s]))
              .then(
                  [=](tensor& y) mutable {
                    if (job->failed) return;
                    job->waiting[s] = false;
                    job->replies[s] = std::move(y);
                    if (--job->pending > 0) return;
                    try {
                      rp.deliver(combine_all(self->state, *job));
                    } catch (const std::exception& e) {
                      rp.deliver(caf::make_error(caf::sec::runtime_error, std::string("router combine: ") + e.what()));
                    }
                  },
                  [=](caf::error& err) mutable {
                    if (job->failed) return;
                    job->failed = true;
                    rp.deliver(caf::make_error(caf::sec::runtime_error, "expert shard " + std::to_string(s) + " failed: " +
                                                                            self->system().render(err)));
                  });
        }
        return rp;
      },
      [=](new_shard_atom, std::int64_t shard, caf::actor& handle) {
        auto& shards = self->state.shards;
        if (shard >= 0 && shard < static_cast<std::int64_t>(shards.size()))
          shards[static_cast<std::size_t>(shard)] = caf::actor_cast<expert_shard_actor>(handle);
      },
      [=](heartbeat_atom) {
        auto& st = self->state;
        for (std::size_t s = 0; s < st.shards.size(); ++s) {
          if (st.shards[s].node() == self->node()) continue;  // local shards are watched by the supervisor
          self->request(st.shards[s], st.heartbeat, heartbeat_atom::value)
              .then(
                  [=](std::int64_t) {
                    auto& d = self->state.down[s];
                    if (!d.empty()) std::cerr << "[router] expert shard " << s << " answers again\n";
                    d.clear();
                  },
                  [=](caf::error& err) {
                    auto& st = self->state;
                    if (st.down[s].empty())
                      std::cerr << "[router] expert shard " << s << " missed a heartbeat (" << self->system().render(err)
                                << "); failing the requests that wait on it\n";
                    st.down[s] = "expert shard " + std::to_string(s) + " does not answer heartbeats within " +
                                 std::to_string(st.heartbeat.count()) + " ms (" + self->system().render(err) + ")";
                    fail_jobs_waiting_on(st, s, st.down[s]);
                  });
        }
        self->delayed_send(self, st.heartbeat, heartbeat_atom::value);
      },
  };
}

}  // namespace

expert_shard_actor spawn_expert_shard(caf::actor_system& sys, shared_compute compute, std::int64_t first,
                                      std::int64_t last) {
  return sys.spawn(shard_impl, std::move(compute), first, last);
}

router_actor spawn_router(caf::actor_system& sys, shared_compute compute, std::vector<expert_shard_actor> shards,
                          std::vector<std::int64_t> shard_first, std::chrono::milliseconds timeout,
                          std::chrono::milliseconds heartbeat) {
  return sys.spawn(router_impl, std::move(compute), std::move(shards), std::move(shard_first), timeout, heartbeat);
}

}  // namespace troupe
