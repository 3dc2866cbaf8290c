#include "model/speculative.hpp"

#include <algorithm>
#include <chrono>

#include "model/text_stream.hpp"
#include "protocol/errors.hpp"
#include "tokenizer/tokenizer.hpp"

namespace troupe {
namespace {

std::int32_t sample_from(std::span<const float> weights, double total, rng& gen) {
  double u = gen.uniform() * total;
  for (std::size_t i = 0; i < weights.size(); ++i) {
    u -= weights[i];
    if (u < 0) return static_cast<std::int32_t>(i);
  }
  for (std::size_t i = weights.size(); i-- > 0;)  // rounding left u >= 0: the last positive weight
    if (weights[i] > 0) return static_cast<std::int32_t>(i);
  return 0;
}

std::vector<float> row(const tensor& logits, std::int64_t r) {
  const float* p = logits.data<float>() + r * logits.dim(1);
  return {p, p + logits.dim(1)};
}

}  // namespace

verify_outcome verify_greedy(std::span<const std::vector<float>> target_logits, std::span<const std::int32_t> drafts) {
  for (std::size_t i = 0; i < drafts.size(); ++i) {
    const auto best = argmax(target_logits[i]);
    if (best != drafts[i]) return {static_cast<std::int64_t>(i), best};
  }
  return {static_cast<std::int64_t>(drafts.size()), argmax(target_logits[drafts.size()])};
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
    if (total <= 0) return {static_cast<std::int64_t>(i), sample_from(p[i], 1.0, gen)};  // p == q up to rounding
    return {static_cast<std::int64_t>(i), sample_from(residual, total, gen)};
  }
  return {static_cast<std::int64_t>(drafts.size()), sample_from(p[drafts.size()], 1.0, gen)};
}

void roll_back(sequence_state& state, std::int64_t num_tokens, const ngram_context& ngram) {
  if (num_tokens > state.num_tokens) throw std::logic_error("roll_back past the end of a sequence");
  state.num_tokens = num_tokens;
  state.ngram = ngram;
}

generation_result generate_speculative(model& target, model& draft, const tokenizer& tok,
                                       const std::vector<std::int32_t>& prompt, const generation_params& params,
                                       const speculation_config& config, speculation_stats& stats,
                                       const text_callback& on_text, const switch_callback& on_switch) {
  if (prompt.empty()) throw input_error("the prompt is empty (no tokens)");
  if (params.max_tokens < 0) throw input_error("max_tokens must be >= 0");
  speculation_policy policy(config);
  if (target.config().vocab_size != draft.config().vocab_size)
    throw input_error("the draft's vocabulary (" + std::to_string(draft.config().vocab_size) + " ids) differs from the target's (" +
                      std::to_string(target.config().vocab_size) + ")");
  validate(params.sampling);
  using clock = std::chrono::steady_clock;
  const bool greedy = params.sampling.temperature == 0;
  const sampler shape(params.sampling);  // the sampling distribution, for p and q alike
  rng gen(params.sampling.seed ^ 0x5bd1e995u);
  generation_result result;
  result.prompt_tokens = static_cast<std::int64_t>(prompt.size());
  text_stream stream(tok, params.stop);
  std::vector<std::int32_t> context = prompt;  // every token so far (for the repetition penalty)
  sequence_state ts, ds;

  const auto t0 = clock::now();
  if (params.max_tokens == 0) return result;
  // Prefill both; the first token comes from the target alone.
  const step_input prefill{&ts, prompt};
  const tensor first = target.forward({&prefill, 1}, logits_mode::last_token);
  const step_input draft_prefill{&ds, prompt};
  draft.forward({&draft_prefill, 1}, logits_mode::last_token);
  result.prefill_seconds = std::chrono::duration<double>(clock::now() - t0).count();
  std::int32_t last;
  {
    const auto logits = row(first, 0);
    last = greedy ? argmax(logits) : sample_from(shape.distribution(logits, context), 1.0, gen);
  }
  std::vector<std::int32_t> draft_pending;  // accepted tokens not yet in the draft's cache

  // Emits one token; false once generation must stop.
  auto emit = [&](std::int32_t id) {
    result.ids.push_back(id);
    context.push_back(id);
    if (params.stop_on_eos && id == target.config().eos_token_id) {
      result.reason = finish_reason::eos;
      return false;
    }
    const auto update = stream.push(id);
    if (!update.text.empty() && on_text) on_text(update.text, id);
    if (update.stopped) {
      result.reason = finish_reason::stop_string;
      return false;
    }
    return static_cast<std::int32_t>(result.ids.size()) < params.max_tokens;
  };
  if (!emit(last)) {
    const auto tail = stream.finish();
    if (!tail.empty() && on_text) on_text(tail, last);
    result.text = stream.text();
    return result;
  }
  draft_pending.push_back(last);

  for (;;) {
    const std::int64_t remaining = params.max_tokens - static_cast<std::int64_t>(result.ids.size());
    const std::int64_t k = std::min<std::int64_t>(policy.next_draft_tokens(), remaining - 1);
    // Draft k tokens, feeding the pending tokens first.
    const std::int64_t draft_base = ds.num_tokens;
    const ngram_context draft_ngram = ds.ngram;
    std::vector<std::int32_t> drafts;
    std::vector<std::vector<float>> q;
    std::vector<std::int32_t> draft_context = context;
    std::vector<std::int32_t> feed = draft_pending;
    for (std::int64_t i = 0; i < k; ++i) {
      const step_input in{&ds, feed};
      const auto logits = row(draft.forward({&in, 1}, logits_mode::last_token), 0);
      std::int32_t d;
      if (greedy) {
        d = argmax(logits);
      } else {
        q.push_back(shape.distribution(logits, draft_context));
        d = sample_from(q.back(), 1.0, gen);
      }
      drafts.push_back(d);
      draft_context.push_back(d);
      feed.assign(1, d);
    }
    // The target scores last and every draft in one forward.
    const std::int64_t target_base = ts.num_tokens;
    const ngram_context target_ngram = ts.ngram;
    std::vector<std::int32_t> verify_tokens{last};
    verify_tokens.insert(verify_tokens.end(), drafts.begin(), drafts.end());
    const step_input in{&ts, verify_tokens};
    const tensor logits = target.forward({&in, 1}, logits_mode::all_tokens);
    std::vector<std::vector<float>> p;
    std::vector<std::int32_t> p_context = context;
    for (std::int64_t i = 0; i <= k; ++i) {
      p.push_back(greedy ? row(logits, i) : shape.distribution(row(logits, i), p_context));
      if (i < k) p_context.push_back(drafts[static_cast<std::size_t>(i)]);
    }
    const verify_outcome v = greedy ? verify_greedy(p, drafts) : verify_sampled(p, q, drafts, gen);
    const speculation_switch change = k > 0 ? policy.record_round(v.accepted) : policy.record_plain_step();
    if (k > 0) {
      ++stats.rounds;
      stats.drafted += k;
      stats.accepted += v.accepted;
    } else {
      ++stats.plain_steps;
    }
    if (change == speculation_switch::turned_off) ++stats.turned_off;
    if (change != speculation_switch::none && on_switch) on_switch(policy.describe(change));

    // Keep last + the accepted drafts in the target; the draft's share of them in the draft.
    ngram_context kept = target_ngram;
    target.advance_ngram(kept, std::span(verify_tokens).first(static_cast<std::size_t>(1 + v.accepted)));
    roll_back(ts, target_base + 1 + v.accepted, kept);
    if (k > 0) {
      const std::int64_t in_draft = std::min(v.accepted, k - 1);  // the last draft was never fed
      std::vector<std::int32_t> draft_kept = draft_pending;
      draft_kept.insert(draft_kept.end(), drafts.begin(), drafts.begin() + in_draft);
      ngram_context dk = draft_ngram;
      draft.advance_ngram(dk, draft_kept);
      roll_back(ds, draft_base + static_cast<std::int64_t>(draft_kept.size()), dk);
      draft_pending.assign(drafts.begin() + in_draft, drafts.begin() + v.accepted);
    }
    bool go = true;
    for (std::int64_t i = 0; i < v.accepted && go; ++i) go = emit(drafts[static_cast<std::size_t>(i)]);
    if (go) go = emit(v.next);
    if (!go) break;
    draft_pending.push_back(v.next);
    last = v.next;
  }
  const auto tail = stream.finish();
  if (!tail.empty() && on_text) on_text(tail, result.ids.back());
  result.text = stream.text();
  result.decode_seconds = std::chrono::duration<double>(clock::now() - t0).count() - result.prefill_seconds;
  return result;
}

}  // namespace troupe
