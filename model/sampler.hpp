// Choosing the next token from logits: greedy, temperature, top-k, top-p, repetition penalty,
// with a seeded generator so a request with a seed is reproducible.
// Invariant: temperature 0 is exactly argmax (lowest id on ties) and consumes no randomness.
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

/// Validates the parameters; throws input_error naming the bad one.
void validate(const sampling_params& params);

/// A small, fast, portable generator (splitmix64): the same seed gives the same stream on
/// every platform, unlike std::*_distribution.
class rng {
 public:
  explicit rng(std::uint64_t seed) : state_(seed) {}
  std::uint64_t next();
  /// Uniform in [0, 1).
  double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }
  /// Standard normal (Box-Muller).
  double normal();

 private:
  std::uint64_t state_;
};

class sampler {
 public:
  explicit sampler(const sampling_params& params);
  /// Picks a token from one row of logits; `context` is the token history for the penalty.
  std::int32_t sample(std::span<const float> logits, std::span<const std::int32_t> context);
  /// The normalised distribution sampling draws from (after penalty, temperature, top-k, top-p);
  /// used by speculative decoding and by tests. Empty for greedy.
  std::vector<float> distribution(std::span<const float> logits, std::span<const std::int32_t> context) const;
  /// The greedy choice: argmax after the repetition penalty (what sample() returns at temperature 0).
  std::int32_t greedy(std::span<const float> logits, std::span<const std::int32_t> context) const;

 private:
  sampling_params params_;
  rng rng_;
};

/// The token whose cumulative weight first exceeds u (0 <= u < total weight); weights need not
/// sum to 1. Rounding that leaves u past the total gives the last token with weight.
std::int32_t draw(std::span<const float> weights, double u);

/// Index of the largest value (lowest index on ties).
std::int32_t argmax(std::span<const float> values);

}  // namespace troupe
