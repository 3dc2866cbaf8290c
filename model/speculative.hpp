// Speculative decoding on one sequence: a draft model proposes k tokens, the target scores all
// k+1 positions in one forward, and the longest valid prefix is kept (spec: model.md section 8;
// the paper deploys a 3-step plain-embedding draft).
//
// Invariant (lossless): greedy output equals the target's own greedy output token for token;
// with sampling, each emitted token is distributed exactly as the target's sampling
// distribution (accept d with min(1, p(d)/q(d)), else resample from max(0, p - q) normalised).
// Rejected tokens leave no trace: the target's latent cache and N-gram cache and the draft's
// cache are rolled back to the accepted tokens.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <vector>

#include "model/generator.hpp"
#include "model/model.hpp"
#include "model/sampler.hpp"
#include "model/speculation_policy.hpp"

namespace troupe {

/// What speculation did for one request.
struct speculation_stats {
  std::int64_t rounds = 0;            // target verification forwards
  std::int64_t drafted = 0;           // tokens the draft proposed
  std::int64_t accepted = 0;          // of those, kept
  std::int64_t plain_steps = 0;       // target steps taken without drafting (speculation off)
  std::int64_t turned_off = 0;        // times the policy switched speculation off
  double mean_acceptance_length() const { return rounds ? static_cast<double>(accepted) / static_cast<double>(rounds) : 0; }
  double acceptance_rate() const { return drafted ? static_cast<double>(accepted) / static_cast<double>(drafted) : 0; }
};

/// The acceptance rule on one round, for k drafts. Greedy: `target_choices` are the target's
/// k+1 greedy tokens. Sampling: `p` are the target's k+1 distributions and `q` the draft's k
/// (rows of V). Returns the number of drafts accepted (0..k) and, in `next`, the token that
/// follows them (the correction on a rejection, or the target's token at position k when all
/// were accepted).
struct verify_outcome {
  std::int64_t accepted = 0;
  std::int32_t next = 0;
};
verify_outcome verify_greedy(std::span<const std::int32_t> target_choices, std::span<const std::int32_t> drafts);
verify_outcome verify_sampled(std::span<const std::vector<float>> p, std::span<const std::vector<float>> q,
                              std::span<const std::int32_t> drafts, rng& gen);

/// One sequence's round as the target sees it: `logits` holds the target's k+1 rows of V (at the
/// token before the drafts, then at each draft), `context` the sequence's tokens up to the
/// first of those positions (for the repetition penalty; returned unchanged). Picks the
/// target's choice or distribution at each position the way `shape` samples, then applies
/// verify_greedy or verify_sampled (q: the draft's k distributions, sampling only).
verify_outcome verify_round(const sampler& shape, bool greedy, std::span<const float> logits, std::size_t vocab,
                            std::vector<std::int32_t>& context, std::span<const std::int32_t> drafts,
                            std::span<const std::vector<float>> q, rng& gen);

/// Why `draft` cannot draft for `target` (another vocabulary or special tokens), or empty.
std::string draft_mismatch(const model& target, const model& draft);

/// Sets a sequence back to its first `num_tokens` tokens: the latent caches keep their blocks
/// (later steps overwrite the rows past the new end) and the N-gram cache becomes `ngram`.
void roll_back(sequence_state& state, std::int64_t num_tokens, const ngram_context& ngram);

/// Called with a line each time the policy turns speculation off or on.
using switch_callback = std::function<void(const std::string&)>;

/// generate() with a draft model proposing up to `config.draft_tokens` tokens per round while
/// the policy keeps speculation on. The two models must share the vocabulary. Same result
/// contract as generate().
generation_result generate_speculative(model& target, model& draft, const tokenizer& tok,
                                       const std::vector<std::int32_t>& prompt, const generation_params& params,
                                       const speculation_config& config, speculation_stats& stats,
                                       const text_callback& on_text = {}, const switch_callback& on_switch = {});

/// Where the draft comes from: asked at every round boundary; a different model swaps the
/// draft (hot swap). A draft of another vocabulary is refused (logged through on_switch) and
/// the current one kept. The previous draft is released after its last use.
using draft_source = std::function<std::shared_ptr<model>()>;

std::vector<generation_result> generate_speculative_batch(
    model& target, const draft_source& source, const tokenizer& tok, const std::vector<std::vector<std::int32_t>>& prompts,
    const std::vector<generation_params>& params, const speculation_config& config, std::vector<speculation_stats>& stats,
    const std::function<void(std::size_t, std::string_view, std::int32_t)>& on_text = {},
    const switch_callback& on_switch = {});

/// The same for a batch of sequences decoded together: each round drafts for every sequence
/// (batched draft forwards; sequences may draft different numbers of tokens, by their own
/// policies) and verifies all of them in one batched target forward. Results, stats and
/// on_text calls carry the sequence's index; each result equals the sequence decoded alone.
std::vector<generation_result> generate_speculative_batch(
    model& target, model& draft, const tokenizer& tok, const std::vector<std::vector<std::int32_t>>& prompts,
    const std::vector<generation_params>& params, const speculation_config& config, std::vector<speculation_stats>& stats,
    const std::function<void(std::size_t, std::string_view, std::int32_t)>& on_text = {},
    const switch_callback& on_switch = {});

}  // namespace troupe
