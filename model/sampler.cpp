#include "model/sampler.hpp"

#include <cmath>

#include "protocol/errors.hpp"

namespace troupe {

void validate(const sampling_params& p) {
  if (!(p.temperature >= 0.0f) || !std::isfinite(p.temperature))
    throw input_error("temperature must be a finite number >= 0, got " + std::to_string(p.temperature));
  if (p.top_k < 0) throw input_error("top_k must be >= 0 (0 = no limit), got " + std::to_string(p.top_k));
  if (!(p.top_p > 0.0f && p.top_p <= 1.0f)) throw input_error("top_p must be in (0, 1], got " + std::to_string(p.top_p));
  if (!(p.repetition_penalty > 0.0f) || !std::isfinite(p.repetition_penalty))
    throw input_error("repetition_penalty must be > 0, got " + std::to_string(p.repetition_penalty));
}

std::uint64_t rng::next() {
  std::uint64_t z = (state_ += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

double rng::normal() {
  double u1 = uniform();
  while (u1 <= 0.0) u1 = uniform();
  const double u2 = uniform();
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * M_PI * u2);
}

sampler::sampler(const sampling_params& params) : params_(params), rng_(params.seed) { validate(params); }

std::vector<float> sampler::distribution(std::span<const float> logits, std::span<const std::int32_t> context) const {
  return sampling_distribution(logits, context, params_);
}

std::int32_t sampler::greedy(std::span<const float> logits, std::span<const std::int32_t> context) const {
  return greedy_token(logits, context, params_.repetition_penalty);
}

std::int32_t sampler::sample(std::span<const float> logits, std::span<const std::int32_t> context) {
  return sample_token(logits, {.params = params_, .u = next_uniform(), .context = context});
}

}  // namespace troupe
