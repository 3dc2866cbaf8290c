#include "model/speculative.hpp"

#include <algorithm>
#include <chrono>
#include <functional>
#include <map>
#include <memory>

#include "model/text_stream.hpp"
#include "protocol/errors.hpp"
#include "tokenizer/tokenizer.hpp"

namespace troupe {
namespace {

std::vector<float> row(const tensor& logits, std::int64_t r) {
  const float* p = logits.data<float>() + r * logits.dim(1);
  return {p, p + logits.dim(1)};
}

}  // namespace

verify_outcome verify_greedy(std::span<const std::int32_t> target_choices, std::span<const std::int32_t> drafts) {
  for (std::size_t i = 0; i < drafts.size(); ++i)
    if (target_choices[i] != drafts[i]) return {static_cast<std::int64_t>(i), target_choices[i]};
  return {static_cast<std::int64_t>(drafts.size()), target_choices[drafts.size()]};
}

verify_outcome verify_round(const sampler& shape, bool greedy, std::span<const float> logits, std::size_t vocab,
                            std::vector<std::int32_t>& context, std::span<const std::int32_t> drafts,
                            std::span<const std::vector<float>> q, rng& gen) {
  const std::size_t k = drafts.size();
  if (logits.size() != (k + 1) * vocab) throw std::logic_error("verify_round: logits are not k+1 rows");
  std::vector<std::int32_t> choices;
  std::vector<std::vector<float>> p;
  const std::size_t own = context.size();
  for (std::size_t i = 0; i <= k; ++i) {  // each position sees the drafts before it (for the penalty)
    const auto row = logits.subspan(i * vocab, vocab);
    if (greedy) choices.push_back(shape.greedy(row, context));
    else p.push_back(shape.distribution(row, context));
    if (i < k) context.push_back(drafts[i]);
  }
  context.resize(own);
  return greedy ? verify_greedy(choices, drafts) : verify_sampled(p, q, drafts, gen);
}

verify_outcome verify_sampled(std::span<const std::vector<float>> p, std::span<const std::vector<float>> q,
                              std::span<const std::int32_t> drafts, rng& gen) {
  for (std::size_t i = 0; i < drafts.size(); ++i) {
    const auto d = static_cast<std::size_t>(drafts[i]);
    const double pd = p[i][d], qd = q[i][d];
    if (qd > 0 && gen.uniform() * qd < pd) continue;  // accepted with probability min(1, p/q)
    // Rejected: the correction comes from max(0, p - q), renormalised.
    std::vector<float> residual(p[i].size());
    double total = 0;
    for (std::size_t v = 0; v < residual.size(); ++v) total += residual[v] = std::max(0.0f, p[i][v] - q[i][v]);
    if (total <= 0) return {static_cast<std::int64_t>(i), draw(p[i], gen.uniform())};  // p == q up to rounding
    return {static_cast<std::int64_t>(i), draw(residual, gen.uniform() * total)};
  }
  return {static_cast<std::int64_t>(drafts.size()), draw(p[drafts.size()], gen.uniform())};
}

void roll_back(sequence_state& state, std::int64_t num_tokens, const ngram_context& ngram) {
  if (num_tokens > state.num_tokens) throw std::logic_error("roll_back past the end of a sequence");
  state.num_tokens = num_tokens;
  state.ngram = ngram;
}

namespace {

// One sequence of a speculative batch: its two caches, policy, sampling state and output.
struct spec_sequence {
  spec_sequence(const std::vector<std::int32_t>& prompt, const generation_params& p, const speculation_config& c,
                const tokenizer& tok)
      : params(p), greedy(p.sampling.temperature == 0),
        argmax_only(greedy && p.sampling.repetition_penalty == 1.0f), shape(p.sampling), gen(p.sampling.seed ^ 0x5bd1e995u), policy(c),
        stream(tok, p.stop), context(prompt) {
    result.prompt_tokens = static_cast<std::int64_t>(prompt.size());
  }

  generation_params params;
  bool greedy;
  bool argmax_only;  // greedy without a penalty: the models pick where the logits are
  sampler shape;  // the sampling distribution, for p and q alike
  rng gen;
  speculation_policy policy;
  text_stream stream;
  std::vector<std::int32_t> context;  // every token so far (for the repetition penalty)
  sequence_state ts, ds;              // target and draft caches
  std::vector<std::int32_t> draft_pending;  // accepted tokens not yet in the draft's cache
  std::int32_t last = 0;                    // the newest token, in neither cache yet
  generation_result result;
  speculation_stats stats;
  bool done = false;
  std::chrono::steady_clock::time_point finished;
  // The round in progress.
  std::int64_t k = 0, draft_base = 0, target_base = 0;
  ngram_context draft_ngram, target_ngram;
  std::vector<std::int32_t> drafts, feed, verify_tokens;
  std::vector<std::vector<float>> q;

  std::int32_t pick(const std::vector<float>& logits) {
    return greedy ? shape.greedy(logits, context) : draw(shape.distribution(logits, context), gen.uniform());
  }
};

using text_sink = std::function<void(std::size_t, std::string_view, std::int32_t)>;

// Emits one token of sequence i; false once it must stop.
bool emit(spec_sequence& s, std::size_t i, std::int32_t id, std::int32_t eos, const text_sink& on_text) {
  s.result.ids.push_back(id);
  s.context.push_back(id);
  if (s.params.stop_on_eos && id == eos) {
    s.result.reason = finish_reason::eos;
    return false;
  }
  const auto update = s.stream.push(id);
  if (!update.text.empty() && on_text) on_text(i, update.text, id);
  if (update.stopped) {
    s.result.reason = finish_reason::stop_string;
    return false;
  }
  return static_cast<std::int32_t>(s.result.ids.size()) < s.params.max_tokens;
}

}  // namespace

std::string draft_mismatch(const model& target, const model& draft) {
  const auto& t = target.config();
  const auto& d = draft.config();
  if (t.vocab_size != d.vocab_size)
    return "the draft's vocabulary (" + std::to_string(d.vocab_size) + " ids) differs from the target's (" +
           std::to_string(t.vocab_size) + ")";
  if (t.eos_token_id != d.eos_token_id || t.bos_token_id != d.bos_token_id)
    return "the draft's special tokens (bos " + std::to_string(d.bos_token_id) + ", eos " + std::to_string(d.eos_token_id) +
           ") differ from the target's (bos " + std::to_string(t.bos_token_id) + ", eos " + std::to_string(t.eos_token_id) + ")";
  return {};
}

std::vector<generation_result> generate_speculative_batch(model& target, const draft_source& source, const tokenizer& tok,
                                                          const std::vector<std::vector<std::int32_t>>& prompts,
                                                          const std::vector<generation_params>& params,
                                                          const speculation_config& config,
                                                          std::vector<speculation_stats>& stats, const text_sink& on_text,
                                                          const switch_callback& on_switch) {
  if (prompts.size() != params.size()) throw std::logic_error("generate_speculative_batch: prompts and params differ in size");
  std::shared_ptr<model> current = source();
  if (!current) throw std::logic_error("generate_speculative_batch: no draft");
  if (auto why = draft_mismatch(target, *current); !why.empty()) throw input_error(why);
  std::vector<std::unique_ptr<spec_sequence>> seqs;
  for (std::size_t i = 0; i < prompts.size(); ++i) {
    if (prompts[i].empty()) throw input_error("the prompt is empty (no tokens)");
    if (params[i].max_tokens < 0) throw input_error("max_tokens must be >= 0");
    validate(params[i].sampling);
    seqs.push_back(std::make_unique<spec_sequence>(prompts[i], params[i], config, tok));
  }
  using clock = std::chrono::steady_clock;
  const auto t0 = clock::now();
  const auto eos = target.config().eos_token_id;
  auto finish = [&](std::size_t i) {
    auto& s = *seqs[i];
    s.done = true;
    s.finished = clock::now();
    const auto tail = s.stream.finish();
    if (!tail.empty() && on_text) on_text(i, tail, s.result.ids.empty() ? -1 : s.result.ids.back());
    s.result.text = s.stream.text();
  };

  // Prefill both models for every sequence; each first token comes from the target alone.
  std::vector<step_input> target_in, draft_in;
  std::vector<std::size_t> live;
  for (std::size_t i = 0; i < seqs.size(); ++i) {
    if (seqs[i]->params.max_tokens == 0) {
      finish(i);
      continue;
    }
    live.push_back(i);
    target_in.push_back({&seqs[i]->ts, prompts[i]});
    draft_in.push_back({&seqs[i]->ds, prompts[i]});
  }
  if (!live.empty()) {
    const tensor first = target.forward(target_in, logits_mode::last_token);
    current->forward(draft_in, logits_mode::last_token);
    const double prefill = std::chrono::duration<double>(clock::now() - t0).count();
    for (std::size_t j = 0; j < live.size(); ++j) {
      auto& s = *seqs[live[j]];
      s.result.prefill_seconds = prefill;
      s.last = s.pick(row(first, static_cast<std::int64_t>(j)));
      if (!emit(s, live[j], s.last, eos, on_text)) finish(live[j]);
      else s.draft_pending.push_back(s.last);
    }
  }

  for (;;) {
    std::vector<spec_sequence*> active;
    std::vector<std::size_t> index;
    for (std::size_t i = 0; i < seqs.size(); ++i)
      if (!seqs[i]->done) {
        active.push_back(seqs[i].get());
        index.push_back(i);
      }
    if (active.empty()) break;
    // Hot swap at the round boundary: a new draft starts with empty caches and catches up on
    // every sequence's tokens in its first forward; the old one is released after its last use.
    if (auto offered = source(); offered && offered != current) {
      if (auto why = draft_mismatch(target, *offered); !why.empty()) {
        if (on_switch) on_switch("draft refused, keeping the current one: " + why);
      } else {
        current = std::move(offered);
        for (auto* s : active) {
          s->ds = sequence_state{};
          s->draft_pending = s->context;
        }
        if (on_switch) on_switch("draft swapped");
      }
    }
    model& draft = *current;
    // Draft, batched: greedy rounds by draft_greedy, others step by step (iteration i runs the
    // draft on every sequence still drafting, k > i). No sequence drafts in a round of more than
    // max_batch sequences.
    const bool over_batch = config.max_batch > 0 && static_cast<std::int64_t>(active.size()) > config.max_batch;
    std::int64_t max_k = 0;
    for (auto* s : active) {
      const std::int64_t remaining = s->params.max_tokens - static_cast<std::int64_t>(s->result.ids.size());
      s->k = over_batch ? 0 : std::min<std::int64_t>(s->policy.next_draft_tokens(), remaining - 1);
      s->draft_base = s->ds.num_tokens;
      s->draft_ngram = s->ds.ngram;
      s->drafts.clear();
      s->q.clear();
      s->feed = s->draft_pending;
      max_k = std::max(max_k, s->k);
    }
    if (std::all_of(active.begin(), active.end(), [](auto* s) { return s->argmax_only; })) {
      // Greedy without a penalty needs only argmaxes: each group of sequences drafting k tokens
      // drafts them in one draft_greedy call (on a GPU one replay; only the ids come back).
      std::map<std::int64_t, std::vector<spec_sequence*>> by_k;
      for (auto* s : active)
        if (s->k > 0) by_k[s->k].push_back(s);
      for (auto& [k, group] : by_k) {
        std::vector<step_input> in;
        for (auto* s : group) in.push_back({&s->ds, s->feed});
        auto picks = draft.draft_greedy(in, k);
        for (std::size_t j = 0; j < group.size(); ++j) group[j]->drafts = std::move(picks[j]);
      }
    } else {
      for (std::int64_t i = 0; i < max_k; ++i) {
        std::vector<spec_sequence*> drafting;
        std::vector<step_input> in;
        for (auto* s : active)
          if (s->k > i) {
            drafting.push_back(s);
            in.push_back({&s->ds, s->feed});
          }
        const tensor logits = draft.forward(in, logits_mode::last_token);
        for (std::size_t j = 0; j < drafting.size(); ++j) {
          auto& s = *drafting[j];
          const auto l = row(logits, static_cast<std::int64_t>(j));
          // The context (for the penalty) is the sequence's tokens plus the drafts so far.
          s.context.insert(s.context.end(), s.drafts.begin(), s.drafts.end());
          std::int32_t d;
          if (s.greedy) {
            d = s.shape.greedy(l, s.context);
          } else {
            s.q.push_back(s.shape.distribution(l, s.context));
            d = draw(s.q.back(), s.gen.uniform());
          }
          s.context.resize(s.context.size() - s.drafts.size());
          s.drafts.push_back(d);
          s.feed.assign(1, d);
        }
      }
    }
    // Verify: the target scores each sequence's last token and drafts in one batched forward.
    std::vector<step_input> in;
    for (auto* s : active) {
      s->target_base = s->ts.num_tokens;
      s->target_ngram = s->ts.ngram;
      s->verify_tokens.assign(1, s->last);
      s->verify_tokens.insert(s->verify_tokens.end(), s->drafts.begin(), s->drafts.end());
      in.push_back({&s->ts, s->verify_tokens});
    }
    const bool argmax_only = std::all_of(active.begin(), active.end(), [](auto* s) { return s->argmax_only; });
    const auto choices = argmax_only ? target.forward_argmax(in, logits_mode::all_tokens) : std::vector<std::int32_t>{};
    const tensor logits = argmax_only ? tensor{} : target.forward(in, logits_mode::all_tokens);
    std::int64_t first_row = 0;
    for (std::size_t j = 0; j < active.size(); ++j) {
      auto& s = *active[j];
      const std::int64_t k = s.k;
      const verify_outcome v =
          argmax_only ? verify_greedy(std::span(choices).subspan(static_cast<std::size_t>(first_row), static_cast<std::size_t>(k + 1)), s.drafts)
                      : verify_round(s.shape, s.greedy,
                                     {logits.data<float>() + first_row * logits.dim(1),
                                      static_cast<std::size_t>((k + 1) * logits.dim(1))},
                                     static_cast<std::size_t>(logits.dim(1)), s.context, s.drafts, s.q, s.gen);
      first_row += k + 1;
      const speculation_switch change = k > 0 ? s.policy.record_round(v.accepted) : s.policy.record_plain_step();
      if (k > 0) {
        ++s.stats.rounds;
        s.stats.drafted += k;
        s.stats.accepted += v.accepted;
      } else {
        ++s.stats.plain_steps;
      }
      if (change == speculation_switch::turned_off) ++s.stats.turned_off;
      if (change != speculation_switch::none && on_switch) on_switch(s.policy.describe(change));

      // Keep last + the accepted drafts in the target; the draft's share of them in the draft.
      ngram_context kept = s.target_ngram;
      target.advance_ngram(kept, std::span(s.verify_tokens).first(static_cast<std::size_t>(1 + v.accepted)));
      roll_back(s.ts, s.target_base + 1 + v.accepted, kept);
      if (k > 0) {
        const std::int64_t in_draft = std::min(v.accepted, k - 1);  // the last draft was never fed
        std::vector<std::int32_t> draft_kept = s.draft_pending;
        draft_kept.insert(draft_kept.end(), s.drafts.begin(), s.drafts.begin() + in_draft);
        ngram_context dk = s.draft_ngram;
        draft.advance_ngram(dk, draft_kept);
        roll_back(s.ds, s.draft_base + static_cast<std::int64_t>(draft_kept.size()), dk);
        s.draft_pending.assign(s.drafts.begin() + in_draft, s.drafts.begin() + v.accepted);
      }
      bool go = true;
      for (std::int64_t i = 0; i < v.accepted && go; ++i) go = emit(s, index[j], s.drafts[static_cast<std::size_t>(i)], eos, on_text);
      if (go) go = emit(s, index[j], v.next, eos, on_text);
      if (!go) {
        finish(index[j]);
        continue;
      }
      s.draft_pending.push_back(v.next);
      s.last = v.next;
    }
  }
  std::vector<generation_result> out;
  stats.clear();
  for (auto& s : seqs) {
    if (s->result.prefill_seconds > 0 || !s->result.ids.empty())
      s->result.decode_seconds = std::chrono::duration<double>(s->finished - t0).count() - s->result.prefill_seconds;
    out.push_back(std::move(s->result));
    stats.push_back(s->stats);
  }
  return out;
}

std::vector<generation_result> generate_speculative_batch(model& target, model& draft, const tokenizer& tok,
                                                          const std::vector<std::vector<std::int32_t>>& prompts,
                                                          const std::vector<generation_params>& params,
                                                          const speculation_config& config,
                                                          std::vector<speculation_stats>& stats, const text_sink& on_text,
                                                          const switch_callback& on_switch) {
  const std::shared_ptr<model> fixed(std::shared_ptr<model>{}, &draft);  // not owned
  return generate_speculative_batch(target, [fixed] { return fixed; }, tok, prompts, params, config, stats, on_text, on_switch);
}

generation_result generate_speculative(model& target, model& draft, const tokenizer& tok,
                                       const std::vector<std::int32_t>& prompt, const generation_params& params,
                                       const speculation_config& config, speculation_stats& stats,
                                       const text_callback& on_text, const switch_callback& on_switch) {
  std::vector<speculation_stats> all;
  auto results = generate_speculative_batch(
      target, draft, tok, {prompt}, {params}, config, all,
      on_text ? text_sink([&](std::size_t, std::string_view text, std::int32_t id) { on_text(text, id); }) : text_sink{},
      on_switch);
  stats = all.at(0);
  return std::move(results.at(0));
}

}  // namespace troupe
