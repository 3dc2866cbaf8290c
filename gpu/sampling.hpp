// How one row of logits becomes a token: a request's sampling rule and the reference math of
// it, shared by the host sampler (model/sampler.hpp) and every backend's sample() op, so the
// device and the host choose the same token from the same logits and the same uniform draw.
// Invariant: temperature 0 is exactly argmax after the penalty (lowest id on ties) and uses no
// randomness; otherwise the token is draw(sampling_distribution(...), u).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

namespace troupe {

struct sampling_params {
  float temperature = 1.0f;        // 0: greedy
  std::int32_t top_k = 0;          // 0: no limit
  float top_p = 1.0f;              // 1: no nucleus cut
  float repetition_penalty = 1.0f; // > 1 discourages tokens already in the context (CTRL rule)
  std::uint64_t seed = 0;
};

/// The normalised distribution a sampled token is drawn from: the repetition penalty applied
/// once to each token of `context`, the top_k largest (lowest id first on ties), softmax at the
/// temperature, then the smallest prefix of them (in that order) whose mass reaches top_p.
/// Empty for greedy.
std::vector<float> sampling_distribution(std::span<const float> logits, std::span<const std::int32_t> context,
                                         const sampling_params& params);

/// The greedy choice: argmax of the penalised logits.
std::int32_t greedy_token(std::span<const float> logits, std::span<const std::int32_t> context, float repetition_penalty);

/// The token whose cumulative weight, in id order, first exceeds u (0 <= u < total weight);
/// weights need not sum to 1. Rounding that leaves u past the total gives the last token with
/// weight.
std::int32_t draw(std::span<const float> weights, double u);

/// Index of the largest value (lowest index on ties).
std::int32_t argmax(std::span<const float> values);

/// One token to choose in a backend's sample(): row `row` of the logits under `params`, with the
/// uniform `u` in [0, 1) (ignored when greedy) and the tokens the penalty looks at.
struct token_draw {
  std::int64_t row = 0;
  sampling_params params;
  double u = 0;
  std::span<const std::int32_t> context;
};

/// The reference of sample(): the token one draw picks from its row of host logits.
std::int32_t sample_token(std::span<const float> row, const token_draw& d);

}  // namespace troupe
