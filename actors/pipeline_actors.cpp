#include "actors/pipeline_actors.hpp"

#include <caf/actor_system.hpp>
#include <caf/stateful_actor.hpp>
#include <caf/typed_event_based_actor.hpp>

#include <unordered_map>

#include "model/speculative.hpp"
#include "protocol/errors.hpp"

namespace troupe {
namespace {

step_layout layout_of(const step_plan& p) { return step_layout::make(p.num_tokens, p.first_position); }

// Exceptions must not escape a handler (CAF would kill the actor with a bare error): convert.
template <class F>
auto guarded(const char* actor, F&& f) -> caf::result<decltype(f())> {
  try {
    return f();
  } catch (const std::exception& e) {
    return caf::make_error(caf::sec::runtime_error, std::string(actor) + ": " + e.what());
  }
}

// ---- embedding -------------------------------------------------------------------------

// One sequence's N-gram cache, and what rewinding it after rejected drafts needs.
struct embedding_sequence {
  ngram_context context;          // after every token embedded so far
  ngram_context before;           // at the start of the last step
  std::int64_t start = 0, end = 0;  // positions the last step covered: [start, end)
  std::vector<std::int32_t> fed;  // the last step's tokens, kept when they held drafts
};

struct embedding_state {
  embedding_state() = default;  // not an aggregate: CAF would otherwise initialise the first member from the actor pointer
  shared_compute compute;
  stage_actor next;
  std::unordered_map<seq_id, embedding_sequence> seqs;
  static inline const char* name = "troupe.embedding";
};

// The sequence's N-gram cache at `position`: where the last step ended, or (drafts rejected)
// rebuilt from the cache before it and the tokens that were kept.
ngram_context& context_at(const model& net, embedding_sequence& s, seq_id id, std::int64_t position) {
  if (position == s.end) return s.context;
  const auto kept = position - s.start;
  if (kept < 0 || kept > static_cast<std::int64_t>(s.fed.size()))
    throw std::runtime_error("sequence " + std::to_string(id) + " continues at position " + std::to_string(position) +
                             ", its n-gram cache is at " + std::to_string(s.end));
  s.context = s.before;
  net.advance_ngram(s.context, std::span(s.fed).first(static_cast<std::size_t>(kept)));
  return s.context;
}

embedding_actor::behavior_type embedding_impl(embedding_actor::stateful_pointer<embedding_state> self,
                                              shared_compute compute, stage_actor next) {
  self->state.compute = std::move(compute);
  self->state.next = std::move(next);
  return {
      [=](forward_atom, step_plan& plan) -> caf::result<step_result> {
        auto& st = self->state;
        std::vector<ngram_context*> contexts;
        hidden_batch out;
        try {
          const step_layout layout = layout_of(plan);
          for (std::size_t i = 0; i < plan.sequences.size(); ++i) {
            const auto id = plan.sequences[i];
            const auto p = plan.first_position[i];
            auto it = st.seqs.find(id);
            if (p > 0 && it == st.seqs.end())
              throw std::runtime_error("no n-gram context for sequence " + std::to_string(id) + " (lost in a restart)");
            if (p == 0) it = st.seqs.insert_or_assign(id, embedding_sequence{}).first;  // a new sequence starts without history
            auto& s = it->second;
            s.before = context_at(*st.compute->net, s, id, p);
            s.start = p;
            s.end = p + plan.num_tokens[i];
            const bool drafts = !plan.draft_tokens.empty() && plan.draft_tokens[i] > 0;
            if (drafts) {
              const auto* t = plan.tokens.data() + layout.row_begin[i];
              s.fed.assign(t, t + plan.num_tokens[i]);
            } else {
              s.fed.clear();
            }
            contexts.push_back(&s.context);
          }
          tensor tokens = tensor::empty({layout.total_rows}, dtype::i32);
          std::copy(plan.tokens.begin(), plan.tokens.end(), tokens.data<std::int32_t>());
          out.hidden = st.compute->net->embed(tokens, layout, contexts);
        } catch (const std::exception& e) {
          return caf::make_error(caf::sec::runtime_error, std::string("embedding: ") + e.what());
        }
        out.plan = std::move(plan);
        return self->delegate(st.next, forward_atom::value, std::move(out));
      },
      [=](free_atom, std::vector<seq_id>& ids) {
        for (auto id : ids) self->state.seqs.erase(id);
        self->send(self->state.next, free_atom::value, std::move(ids));  // frees travel down the pipeline
      },
      [=](new_next_atom, caf::actor& next) { self->state.next = caf::actor_cast<stage_actor>(next); },
  };
}

// ---- attention stage -------------------------------------------------------------------

struct stage_job {
  hidden_batch batch;
  step_layout layout;
  std::vector<seq_id> ids;  // the step's sequences; their caches are looked up at each use, since
                            // a sequence can be freed (cancelled, failed) while its step waits on the MoE
  block_front front;
  tensor back;
  bool failed = false;  // an error was delivered; a late MoE reply is ignored
};

struct stage_state {
  stage_state() = default;  // not an aggregate: CAF would otherwise initialise the first member from the actor pointer
  shared_compute compute;
  std::int64_t first = 0, last = 0;
  router_actor router;
  stage_actor next;
  std::chrono::milliseconds timeout{0};
  std::unique_ptr<latent_block_allocator> blocks;  // this stage's KV blocks (its layers, every sequence)
  std::unordered_map<seq_id, std::vector<latent_cache>> caches;
  static inline const char* name = "troupe.stage";

  void free(seq_id id) {
    auto it = caches.find(id);
    if (it == caches.end()) return;
    for (auto& layer : it->second) blocks->release(layer.blocks);
    caches.erase(it);
  }
};

using stage_pointer = stage_actor::stateful_pointer<stage_state>;

std::vector<latent_cache*> layer_caches(stage_state& st, const stage_job& job, std::int64_t local_layer) {
  std::vector<latent_cache*> out;
  for (auto id : job.ids) {
    auto it = st.caches.find(id);
    if (it == st.caches.end()) throw std::runtime_error("sequence " + std::to_string(id) + " was freed during its step");
    out.push_back(&it->second[static_cast<std::size_t>(local_layer)]);
  }
  return out;
}

void run_block(stage_pointer self, std::shared_ptr<stage_job> job, std::int64_t block,
               caf::typed_response_promise<step_result> rp) {
  auto& st = self->state;
  if (block == st.last) {
    rp.delegate(st.next, forward_atom::value, std::move(job->batch));
    return;
  }
  model& net = *st.compute->net;
  const std::int64_t local = 2 * (block - st.first);
  try {
    job->front = net.block_front_half(block, job->batch.hidden, job->layout, layer_caches(st, *job, local), *st.blocks);
  } catch (const std::exception& e) {
    rp.deliver(caf::make_error(caf::sec::runtime_error, "stage block " + std::to_string(block) + ": " + e.what()));
    return;
  }
  // The MoE runs in the router and expert shards while this stage computes the rest of the block.
  self->request(st.router, st.timeout, moe_atom::value, static_cast<std::int32_t>(block), job->front.u)
      .then(
          [=](tensor& moe_out) mutable {
            if (job->failed) return;
            self->state.compute->be->add(job->back, moe_out);  // out = (c + MLP_1(v)) + moe
            job->batch.hidden = job->back;
            run_block(self, job, block + 1, rp);
          },
          [=](caf::error& err) mutable {
            if (!job->failed)
              rp.deliver(caf::make_error(caf::sec::runtime_error, "MoE of block " + std::to_string(block) + ": " +
                                                                      self->system().render(err)));
            job->failed = true;
          });
  try {
    job->back = net.block_back_half(block, job->front, job->layout, layer_caches(st, *job, local + 1), *st.blocks);
  } catch (const std::exception& e) {
    job->failed = true;
    rp.deliver(caf::make_error(caf::sec::runtime_error, "stage block " + std::to_string(block) + ": " + e.what()));
  }
}

stage_actor::behavior_type stage_impl(stage_pointer self, shared_compute compute, std::int64_t first, std::int64_t last,
                                      router_actor router, stage_actor next, stage_options options) {
  auto& st = self->state;
  const auto& c = compute->net->config();
  st.blocks = std::make_unique<latent_block_allocator>(*compute->be, options.kv_block_tokens,
                                                       c.kv_lora_rank + c.qk_rope_head_dim,
                                                       options.kv_blocks * 2 * (last - first));
  st.compute = std::move(compute);
  st.first = first;
  st.last = last;
  st.router = std::move(router);
  st.next = std::move(next);
  st.timeout = options.timeout;
  return {
      [=](forward_atom, hidden_batch& batch) -> caf::result<step_result> {
        auto job = std::make_shared<stage_job>();
        try {
          job->layout = layout_of(batch.plan);
        } catch (const std::exception& e) {
          return caf::make_error(caf::sec::runtime_error, std::string("stage: ") + e.what());
        }
        const auto layers = static_cast<std::size_t>(2 * (self->state.last - self->state.first));
        for (std::size_t i = 0; i < batch.plan.sequences.size(); ++i) {
          const seq_id id = batch.plan.sequences[i];
          if (batch.plan.first_position[i] > 0 && !self->state.caches.count(id))
            return caf::make_error(caf::sec::runtime_error,
                                   "stage (blocks " + std::to_string(self->state.first) + "-" +
                                       std::to_string(self->state.last - 1) + ") has no KV cache for sequence " +
                                       std::to_string(id) + " at position " + std::to_string(batch.plan.first_position[i]) +
                                       " (lost in a restart)");
          if (batch.plan.first_position[i] == 0) self->state.free(id);  // a new sequence starts empty
          self->state.caches[id].resize(layers);
          job->ids.push_back(id);
        }
        job->batch = std::move(batch);
        auto rp = self->make_response_promise<step_result>();
        run_block(self, job, self->state.first, rp);
        return rp;
      },
      [=](free_atom, std::vector<seq_id>& ids) {
        for (auto id : ids) self->state.free(id);  // blocks go back to the pool
        self->send(self->state.next, free_atom::value, std::move(ids));
      },
      [=](new_next_atom, caf::actor& next) { self->state.next = caf::actor_cast<stage_actor>(next); },
      [=](new_router_atom, caf::actor& router) { self->state.router = caf::actor_cast<router_actor>(router); },
  };
}

// ---- head ------------------------------------------------------------------------------

struct sequence_sampler {
  explicit sequence_sampler(const sampling_params& p) : pick(p), verify(p.seed ^ 0x2545f4914f6cdd1dull), greedy(p.temperature == 0) {}
  sampler pick;
  rng verify;                         // the rejection rule's randomness (speculative steps)
  bool greedy;
  std::vector<std::int32_t> context;  // tokens by position, for the repetition penalty
};

struct head_state {
  head_state() = default;  // not an aggregate: CAF would otherwise initialise the first member from the actor pointer
  shared_compute compute;
  std::unordered_map<seq_id, sequence_sampler> samplers;
  static inline const char* name = "troupe.head";
};

// The head's rows of a step: each sequence's last row, or its last 1 + k rows when it
// carries k drafts (the target's prediction after each of them).
std::vector<std::int32_t> scored_rows(const step_plan& plan, const step_layout& layout) {
  std::vector<std::int32_t> rows;
  for (std::size_t i = 0; i < plan.sequences.size(); ++i) {
    const std::int64_t k = plan.draft_tokens.empty() ? 0 : plan.draft_tokens[i];
    const std::int64_t end = layout.row_begin[i] + layout.num_rows[i];
    for (std::int64_t r = end - 1 - k; r < end; ++r) rows.push_back(static_cast<std::int32_t>(r));
  }
  return rows;
}

// The target's hidden states (before the final norm) of the positions a step settled: each
// sequence's own tokens and its accepted drafts (the MTP draft builds on them).
void settled_hidden(compute_context& compute, const hidden_batch& batch, const step_layout& layout, step_result& out) {
  const auto& plan = batch.plan;
  std::vector<std::int32_t> rows;
  for (std::size_t i = 0; i < plan.sequences.size(); ++i) {
    const std::int64_t k = plan.draft_tokens.empty() ? 0 : plan.draft_tokens[i];
    const std::int64_t n = layout.num_rows[i] - k + out.accepted[i];
    for (std::int64_t r = 0; r < n; ++r) rows.push_back(static_cast<std::int32_t>(layout.row_begin[i] + r));
    out.hidden_rows.push_back(n);
  }
  out.hidden = compute.be->download(compute.net->gather(batch.hidden, rows));
}

stage_actor::behavior_type head_impl(stage_actor::stateful_pointer<head_state> self, shared_compute compute) {
  self->state.compute = std::move(compute);
  return {
      [=](forward_atom, hidden_batch& batch) -> caf::result<step_result> {
        return guarded("head", [&] {
          auto& st = self->state;
          const auto& plan = batch.plan;
          const step_layout layout = layout_of(plan);
          model& net = *st.compute->net;
          backend& be = *st.compute->be;
          const tensor logits = net.head(net.gather(batch.hidden, scored_rows(plan, layout)));  // on the device
          const auto vocab = static_cast<std::size_t>(logits.dim(1));
          tensor host_logits;  // downloaded only for verification (the rejection rule runs on the host)
          std::vector<token_draw> draws;       // sequences without drafts: sampled where the logits are
          std::vector<std::size_t> draw_slot;  // where each draw's token goes in out.tokens
          step_result out;
          out.step = plan.step;
          out.sequences = plan.sequences;
          out.draft_model = plan.draft_model;
          std::size_t row = 0, q_row = 0;
          for (std::size_t i = 0; i < plan.sequences.size(); ++i) {
            auto it = st.samplers.find(plan.sequences[i]);
            if (plan.first_position[i] > 0 && it == st.samplers.end())
              throw std::runtime_error("no sampler state for sequence " + std::to_string(plan.sequences[i]) +
                                       " (lost in a restart)");
            if (plan.first_position[i] == 0)
              it = st.samplers.insert_or_assign(plan.sequences[i], sequence_sampler(plan.sampling[i])).first;
            auto& s = it->second;
            const std::int64_t k = plan.draft_tokens.empty() ? 0 : plan.draft_tokens[i];
            const auto* t = plan.tokens.data() + layout.row_begin[i];
            // Rejected drafts of the last step leave the context; this step's own tokens join it.
            s.context.resize(static_cast<std::size_t>(plan.first_position[i]));
            s.context.insert(s.context.end(), t, t + layout.num_rows[i] - k);
            const std::size_t first_row = row;
            row += static_cast<std::size_t>(k + 1);
            if (k == 0) {
              draws.push_back({.row = static_cast<std::int64_t>(first_row), .params = s.pick.params(),
                               .u = s.pick.next_uniform(), .context = s.context});
              draw_slot.push_back(out.tokens.size());
              out.tokens.push_back(-1);
              out.drafted.push_back(0);
              out.accepted.push_back(0);
              continue;
            }
            if (!host_logits.defined()) host_logits = be.download(logits);
            const std::span<const float> scores(host_logits.data<float>() + first_row * vocab,
                                                static_cast<std::size_t>(k + 1) * vocab);
            const std::span<const std::int32_t> drafts(t + layout.num_rows[i] - k, static_cast<std::size_t>(k));
            std::vector<std::vector<float>> q;
            if (!s.greedy && (!plan.draft_probs.defined() || plan.draft_probs.dim(1) != static_cast<std::int64_t>(vocab) ||
                              static_cast<std::int64_t>(q_row) + k > plan.draft_probs.dim(0)))
              throw std::runtime_error("sequence " + std::to_string(plan.sequences[i]) +
                                       " carries sampled drafts without the draft's distributions");
            if (!s.greedy)
              for (std::int64_t j = 0; j < k; ++j, ++q_row) {
                const float* r = plan.draft_probs.data<float>() + q_row * vocab;
                q.emplace_back(r, r + vocab);
              }
            const verify_outcome v = verify_round(s.pick, s.greedy, scores, vocab, s.context, drafts, q, s.verify);
            s.context.insert(s.context.end(), drafts.begin(), drafts.begin() + v.accepted);
            out.tokens.insert(out.tokens.end(), drafts.begin(), drafts.begin() + v.accepted);
            out.tokens.push_back(v.next);
            out.drafted.push_back(k);
            out.accepted.push_back(v.accepted);
          }
          if (!draws.empty()) {  // only the tokens come back to the host
            tensor picked = be.empty({static_cast<std::int64_t>(draws.size())}, dtype::i32);
            be.sample(logits, draws, picked);
            const tensor host = be.download(picked);
            for (std::size_t d = 0; d < draws.size(); ++d) out.tokens[draw_slot[d]] = host.data<std::int32_t>()[d];
          }
          if (plan.want_hidden) settled_hidden(*st.compute, batch, layout, out);
          return out;
        });
      },
      [=](free_atom, std::vector<seq_id>& ids) {
        for (auto id : ids) self->state.samplers.erase(id);
      },
      [=](new_next_atom, caf::actor&) {},    // the head is last: it has no successor
      [=](new_router_atom, caf::actor&) {},  // and no MoE
  };
}

}  // namespace

embedding_actor spawn_embedding(caf::actor_system& sys, shared_compute compute, stage_actor next) {
  return sys.spawn(embedding_impl, std::move(compute), std::move(next));
}

stage_actor spawn_stage(caf::actor_system& sys, shared_compute compute, std::int64_t first_block, std::int64_t last_block,
                        router_actor router, stage_actor next, stage_options options) {
  return sys.spawn(stage_impl, std::move(compute), first_block, last_block, std::move(router), std::move(next), options);
}

stage_actor spawn_head(caf::actor_system& sys, shared_compute compute) { return sys.spawn(head_impl, std::move(compute)); }

}  // namespace troupe
