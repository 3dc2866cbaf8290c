#include "actors/scheduler_actor.hpp"

#include <caf/actor_system.hpp>
#include <caf/send.hpp>
#include <caf/stateful_actor.hpp>
#include <caf/typed_event_based_actor.hpp>

#include <deque>
#include <iostream>
#include <map>
#include <optional>

#include "protocol/errors.hpp"

namespace troupe {
namespace {

using clock_type = std::chrono::steady_clock;

struct request_state {
  generate_request req;
  caf::actor subscriber;
  seq_id seq = 0;
  std::int64_t blocks = 0;            // KV blocks reserved
  std::int64_t cached = 0;            // tokens in the caches
  std::vector<std::int32_t> generated;
  std::int64_t fed = 0;               // tokens the step in flight adds before its drafts
  std::optional<speculation_policy> policy;
  std::int64_t rounds = 0, drafted = 0, accepted = 0;
  std::vector<float> hidden;          // the target's hidden states the last step settled, for the next plan (MTP)
  std::int64_t hidden_rows = 0;
  bool cancelled = false;
  bool in_step = false;               // in a step in flight (a sequence is in at most one)
  clock_type::time_point arrived, first_token, last_token;
};

struct scheduler_state {
  scheduler_state() = default;  // not an aggregate: CAF would otherwise initialise the first member from the actor pointer
  embedding_actor entry;
  scheduler_limits limits;
  std::deque<request_state> waiting;
  std::map<seq_id, request_state> running;
  std::int64_t blocks_used = 0;
  seq_id next_seq = 1;
  std::uint64_t next_step = 1;
  std::map<std::uint64_t, std::vector<seq_id>> in_flight;  // step -> its sequences; replies to others are stale
  scheduler_metrics metrics;
  double ttft_sum = 0, itl_sum = 0;
  std::int64_t ttft_n = 0, itl_n = 0;
  std::map<std::string, draft_metrics> drafts;  // per draft model
  bool over_batch_cutoff = false;               // speculation paused for the batch size (logged on change)
  static inline const char* name = "troupe.scheduler";
};

using scheduler_pointer = scheduler_actor::stateful_pointer<scheduler_state>;

void finish(scheduler_pointer self, request_state& r, request_end reason, const std::string& error = {}) {
  auto& st = self->state;
  request_done done;
  done.id = r.req.id;
  done.reason = reason;
  done.error = error;
  done.prompt_tokens = static_cast<std::int64_t>(r.req.prompt.size());
  done.completion_tokens = static_cast<std::int64_t>(r.generated.size());
  const auto now = clock_type::now();
  done.total_s = std::chrono::duration<double>(now - r.arrived).count();
  if (!r.generated.empty()) done.time_to_first_token_s = std::chrono::duration<double>(r.first_token - r.arrived).count();
  done.draft_rounds = r.rounds;
  done.drafted_tokens = r.drafted;
  done.accepted_tokens = r.accepted;
  caf::anon_send(r.subscriber, done_atom::value, std::move(done));
  st.blocks_used -= r.blocks;
  switch (reason) {
    case request_end::error: ++st.metrics.requests_failed; break;
    case request_end::cancelled: ++st.metrics.requests_cancelled; break;
    default: ++st.metrics.requests_finished; break;
  }
}

void free_sequences(scheduler_pointer self, std::vector<seq_id> ids) {
  if (ids.empty()) return;
  self->send(self->state.entry, free_atom::value, std::move(ids));
}

void schedule(scheduler_pointer self);
void send_step(scheduler_pointer self, const std::vector<seq_id>& sequences);

// Moves waiting requests into the running batch while the KV budget and batch size allow.
void admit(scheduler_pointer self) {
  auto& st = self->state;
  while (!st.waiting.empty() && static_cast<std::int64_t>(st.running.size()) < st.limits.max_running) {
    auto& r = st.waiting.front();
    if (r.cancelled) {
      finish(self, r, request_end::cancelled);
      st.waiting.pop_front();
      continue;
    }
    if (st.blocks_used + r.blocks > st.limits.kv_blocks) break;  // first come, first served
    st.blocks_used += r.blocks;
    r.seq = st.next_seq++;
    st.running.emplace(r.seq, std::move(r));
    st.waiting.pop_front();
  }
}

// Speculation's bookkeeping for one sequence's step: stats, per-draft metrics, the policy.
void record_speculation(scheduler_pointer self, request_state& r, std::int64_t drafted, std::int64_t accepted,
                        const std::string& draft) {
  auto& st = self->state;
  if (!r.policy) return;
  speculation_switch change;
  if (drafted > 0) {
    ++r.rounds;
    r.drafted += drafted;
    r.accepted += accepted;
    auto& m = st.drafts[draft];
    m.draft = draft;
    ++m.rounds;
    m.drafted += drafted;
    m.accepted += accepted;
    change = r.policy->record_round(accepted);
  } else {
    change = r.policy->record_plain_step();
  }
  if (change == speculation_switch::turned_off) ++st.metrics.speculation_off_switches;
  if (change != speculation_switch::none)
    std::cerr << "[scheduler] request '" << r.req.id << "': " << r.policy->describe(change) << std::endl;
}

void on_step_done(scheduler_pointer self, const step_result& result) {
  auto& st = self->state;
  std::vector<seq_id> ended;
  const auto now = clock_type::now();
  std::size_t offset = 0;
  std::int64_t hidden_offset = 0;
  for (std::size_t i = 0; i < result.sequences.size(); ++i) {
    const std::int64_t accepted = result.accepted.empty() ? 0 : result.accepted[i];
    const std::int64_t drafted = result.drafted.empty() ? 0 : result.drafted[i];
    const std::span<const std::int32_t> tokens(result.tokens.data() + offset, static_cast<std::size_t>(1 + accepted));
    offset += tokens.size();
    const std::int64_t rows = result.hidden_rows.empty() ? 0 : result.hidden_rows[i];
    const float* hidden = rows ? result.hidden.data<float>() + hidden_offset * result.hidden.dim(1) : nullptr;
    hidden_offset += rows;
    auto it = st.running.find(result.sequences[i]);
    if (it == st.running.end()) continue;
    auto& r = it->second;
    r.cached += r.fed + accepted;
    r.hidden_rows = rows;
    r.hidden.assign(hidden, hidden + (rows ? rows * result.hidden.dim(1) : 0));  // the step's own tokens and the accepted drafts are in the caches
    if (r.cancelled) {
      finish(self, r, request_end::cancelled);
      ended.push_back(r.seq);
      continue;
    }
    record_speculation(self, r, drafted, accepted, result.draft_model);
    if (r.generated.empty()) {
      r.first_token = now;
      st.ttft_sum += std::chrono::duration<double>(now - r.arrived).count();
      ++st.ttft_n;
    } else {
      st.itl_sum += std::chrono::duration<double>(now - r.last_token).count();
      st.itl_n += static_cast<std::int64_t>(tokens.size());
    }
    r.last_token = now;
    for (const std::int32_t token : tokens) {
      r.generated.push_back(token);
      ++st.metrics.generated_tokens;
      caf::anon_send(r.subscriber, token_atom::value, r.req.id, token);
      if (r.req.stop_on_eos && token == st.limits.eos_token_id) {
        finish(self, r, request_end::eos), ended.push_back(r.seq);
        break;
      }
      if (static_cast<std::int32_t>(r.generated.size()) >= r.req.max_tokens) {
        finish(self, r, request_end::length), ended.push_back(r.seq);
        break;
      }
    }
  }
  for (auto id : ended) st.running.erase(id);
  free_sequences(self, std::move(ended));
}

void on_step_failed(scheduler_pointer self, const std::vector<seq_id>& sequences, const caf::error& err) {
  auto& st = self->state;
  const std::string what = "step failed: " + self->system().render(err);
  std::vector<seq_id> ended;
  for (auto id : sequences) {
    auto it = st.running.find(id);
    if (it == st.running.end()) continue;
    finish(self, it->second, request_end::error, what);
    ended.push_back(id);
    st.running.erase(it);
  }
  free_sequences(self, std::move(ended));
}

// Tokens sequence r may draft in its next step: its policy's k, never past max_tokens (the
// target adds one token of its own), none while the batch is over the cutoff.
std::int64_t draft_budget(const scheduler_state& st, const request_state& r) {
  if (!r.policy || st.over_batch_cutoff) return 0;
  const std::int64_t remaining = r.req.max_tokens - static_cast<std::int64_t>(r.generated.size());
  return std::clamp<std::int64_t>(r.policy->next_draft_tokens(), 0, remaining - 1);
}

// Hands each sequence's settled hidden states (from its last step) to the plan, for the MTP draft.
void attach_hidden(scheduler_state& st, step_plan& plan) {
  std::int64_t total = 0, width = 0;
  for (auto id : plan.sequences) {
    const auto& r = st.running.at(id);
    total += r.hidden_rows;
    if (r.hidden_rows) width = static_cast<std::int64_t>(r.hidden.size()) / r.hidden_rows;
  }
  if (total == 0) return;
  plan.target_hidden = tensor::empty({total, width}, dtype::f32);
  float* out = plan.target_hidden.data<float>();
  for (auto id : plan.sequences) {
    auto& r = st.running.at(id);
    plan.hidden_rows.push_back(r.hidden_rows);
    out = std::copy(r.hidden.begin(), r.hidden.end(), out);
    r.hidden.clear();
    r.hidden_rows = 0;
  }
}

void send_step(scheduler_pointer self, const std::vector<seq_id>& sequences) {
  auto& st = self->state;
  step_plan plan;
  plan.step = st.next_step++;
  if (st.limits.speculative) {
    const bool over = st.limits.speculation_max_batch > 0 &&
                      static_cast<std::int64_t>(sequences.size()) > st.limits.speculation_max_batch;
    if (over != st.over_batch_cutoff)
      std::cerr << "[scheduler] speculation " << (over ? "paused" : "resumed") << ": " << sequences.size()
                << " sequences in a step (cutoff " << st.limits.speculation_max_batch << ")" << std::endl;
    st.over_batch_cutoff = over;
  }
  for (auto id : sequences) {
    auto& r = st.running.at(id);
    r.in_step = true;
    plan.sequences.push_back(id);
    plan.first_position.push_back(r.cached);
    plan.sampling.push_back(r.req.sampling);
    if (r.generated.empty()) {
      plan.num_tokens.push_back(static_cast<std::int64_t>(r.req.prompt.size()));
      plan.tokens.insert(plan.tokens.end(), r.req.prompt.begin(), r.req.prompt.end());
      st.metrics.prompt_tokens += static_cast<std::int64_t>(r.req.prompt.size());
    } else {
      plan.num_tokens.push_back(1);
      plan.tokens.push_back(r.generated.back());
    }
    r.fed = plan.num_tokens.back();
    if (st.limits.speculative) plan.draft_tokens.push_back(draft_budget(st, r));
  }
  attach_hidden(st, plan);
  const auto step = plan.step;
  st.in_flight.emplace(step, sequences);
  ++st.metrics.steps;
  auto release = [self, step] {
    auto& st = self->state;
    auto it = st.in_flight.find(step);
    if (it == st.in_flight.end()) return false;  // abandoned when an actor died
    for (auto id : it->second)
      if (auto r = st.running.find(id); r != st.running.end()) r->second.in_step = false;
    st.in_flight.erase(it);
    return true;
  };
  self->request(st.entry, st.limits.step_timeout, forward_atom::value, std::move(plan))
      .then(
          [=](step_result& result) {
            if (!release()) return;
            on_step_done(self, result);
            schedule(self);
          },
          [=](caf::error& err) {
            if (!release()) return;
            on_step_failed(self, sequences, err);
            schedule(self);
          });
}

// Admits waiting requests and keeps up to `micro_batches` steps in flight, each with a share
// of the running sequences that are not in a step, so every pipeline stage has work.
void schedule(scheduler_pointer self) {
  auto& st = self->state;
  admit(self);
  // Cancelled sequences not in a step leave now.
  std::vector<seq_id> ended;
  for (auto it = st.running.begin(); it != st.running.end();) {
    if (it->second.cancelled && !it->second.in_step) {
      finish(self, it->second, request_end::cancelled);
      ended.push_back(it->first);
      it = st.running.erase(it);
    } else {
      ++it;
    }
  }
  free_sequences(self, std::move(ended));
  st.metrics.waiting = static_cast<std::int64_t>(st.waiting.size());
  st.metrics.running = static_cast<std::int64_t>(st.running.size());
  const auto depth = static_cast<std::size_t>(std::max<std::int64_t>(1, st.limits.micro_batches));
  const std::size_t per_step = std::max<std::size_t>(1, (st.running.size() + depth - 1) / depth);
  while (st.in_flight.size() < depth) {
    std::vector<seq_id> ready;
    for (const auto& [id, r] : st.running)
      if (!r.in_step && ready.size() < per_step) ready.push_back(id);
    if (ready.empty()) break;
    send_step(self, ready);
  }
}

scheduler_actor::behavior_type scheduler_impl(scheduler_pointer self, embedding_actor entry, scheduler_limits limits) {
  auto& st = self->state;
  st.entry = std::move(entry);
  st.limits = limits;
  st.metrics.kv_blocks_total = limits.kv_blocks;
  return {
      [=](generate_atom, generate_request& req, caf::actor subscriber) -> caf::result<bool> {
        auto& st = self->state;
        auto refuse = [&](const std::string& why) {
          ++st.metrics.requests_rejected;
          return caf::make_error(caf::sec::runtime_error, "request '" + req.id + "' refused: " + why);
        };
        if (req.prompt.empty()) return refuse("the prompt is empty");
        if (req.max_tokens < 0) return refuse("max_tokens must be >= 0");
        try {
          validate(req.sampling);
        } catch (const input_error& e) {
          return refuse(e.what());
        }
        const std::int64_t total = static_cast<std::int64_t>(req.prompt.size()) + req.max_tokens;
        if (st.limits.max_context && total > st.limits.max_context)
          return refuse("prompt (" + std::to_string(req.prompt.size()) + ") + max_tokens (" +
                        std::to_string(req.max_tokens) + ") exceeds the context length " +
                        std::to_string(st.limits.max_context));
        // Speculation writes up to k drafts past the last kept token into the caches.
        const std::int32_t k = st.limits.speculative
                                   ? static_cast<std::int32_t>(std::min<std::int64_t>(
                                         req.draft_tokens < 0 ? st.limits.speculation.draft_tokens : req.draft_tokens,
                                         st.limits.max_draft_tokens))
                                   : 0;
        if (req.draft_tokens > st.limits.max_draft_tokens)
          return refuse("draft_tokens (" + std::to_string(req.draft_tokens) + ") exceeds the server's limit of " +
                        std::to_string(st.limits.max_draft_tokens));
        const std::int64_t blocks = (total + k + st.limits.kv_block_tokens - 1) / st.limits.kv_block_tokens;
        if (blocks > st.limits.kv_blocks)
          return refuse("needs " + std::to_string(blocks) + " KV blocks, the whole budget is " +
                        std::to_string(st.limits.kv_blocks));
        if (static_cast<std::int64_t>(st.waiting.size()) >= st.limits.max_waiting)
          return refuse("the queue is full (" + std::to_string(st.limits.max_waiting) + " waiting); retry later");
        request_state r;
        r.req = std::move(req);
        r.subscriber = std::move(subscriber);
        r.blocks = blocks;
        r.arrived = clock_type::now();
        if (k > 0) {
          speculation_config c = st.limits.speculation;
          c.draft_tokens = k;
          r.policy.emplace(c);
        }
        if (r.req.max_tokens == 0) {
          finish(self, r, request_end::length);
          return true;
        }
        st.waiting.push_back(std::move(r));
        schedule(self);
        return true;
      },
      [=](cancel_atom, std::string& id) {
        auto& st = self->state;
        for (auto& r : st.waiting)
          if (r.req.id == id) r.cancelled = true;
        for (auto& [seq, r] : st.running)
          if (r.req.id == id) r.cancelled = true;
        schedule(self);
      },
      [=](new_entry_atom, caf::actor& entry) { self->state.entry = caf::actor_cast<embedding_actor>(entry); },
      [=](actor_down_atom, std::string& what, bool stateful) {
        // A graph actor died. Steps in flight may wait on it for ever (a promise it held is
        // gone): they fail now rather than at the step timeout. If it held per-sequence state
        // (KV caches, n-gram contexts, samplers), every running sequence lost some: all fail.
        auto& st = self->state;
        std::vector<seq_id> affected;
        for (const auto& [step, seqs] : st.in_flight) affected.insert(affected.end(), seqs.begin(), seqs.end());
        st.in_flight.clear();
        if (stateful)
          for (const auto& [id, r] : st.running)
            if (!r.in_step) affected.push_back(id);
        for (auto& [id, r] : st.running) r.in_step = false;
        if (!affected.empty()) on_step_failed(self, affected, caf::make_error(caf::sec::runtime_error, what));
        schedule(self);
      },
      [=](metrics_atom) -> scheduler_metrics {
        auto& st = self->state;
        auto m = st.metrics;
        m.waiting = static_cast<std::int64_t>(st.waiting.size());
        m.running = static_cast<std::int64_t>(st.running.size());
        m.kv_blocks_used = st.blocks_used;
        m.mean_time_to_first_token_s = st.ttft_n ? st.ttft_sum / static_cast<double>(st.ttft_n) : 0;
        m.mean_inter_token_s = st.itl_n ? st.itl_sum / static_cast<double>(st.itl_n) : 0;
        for (const auto& [name, d] : st.drafts) m.drafts.push_back(d);
        return m;
      },
  };
}

}  // namespace

scheduler_actor spawn_scheduler(caf::actor_system& sys, embedding_actor entry, scheduler_limits limits) {
  return sys.spawn(scheduler_impl, std::move(entry), limits);
}

}  // namespace troupe
