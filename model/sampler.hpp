// Choosing the next token from logits: greedy, temperature, top-k, top-p, repetition penalty,
// with a seeded generator so a request with a seed is reproducible.
// Invariant: temperature 0 is exactly argmax (lowest id on ties) and consumes no randomness.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "gpu/sampling.hpp"

namespace troupe {

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
  /// The uniform the next sampled token is drawn with, consumed as sample() would (0 for
  /// greedy, which draws nothing): for a backend's sample(), so device and host draws agree.
  double next_uniform() { return params_.temperature == 0.0f ? 0.0 : rng_.uniform(); }
  const sampling_params& params() const { return params_; }

 private:
  sampling_params params_;
  rng rng_;
};

}  // namespace troupe
