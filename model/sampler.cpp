#include "model/sampler.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <unordered_set>

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

namespace {

// Logits with the CTRL repetition penalty applied once to every token seen in the context.
std::vector<float> penalised(std::span<const float> logits, std::span<const std::int32_t> context, float penalty) {
  std::vector<float> z(logits.begin(), logits.end());
  if (penalty == 1.0f) return z;
  for (auto id : std::unordered_set<std::int32_t>(context.begin(), context.end())) {
    if (id < 0 || static_cast<std::size_t>(id) >= z.size()) continue;
    float& l = z[static_cast<std::size_t>(id)];
    l = l > 0 ? l / penalty : l * penalty;
  }
  return z;
}

}  // namespace

std::int32_t argmax(std::span<const float> v) {
  return static_cast<std::int32_t>(std::max_element(v.begin(), v.end()) - v.begin());
}

sampler::sampler(const sampling_params& params) : params_(params), rng_(params.seed) { validate(params); }

std::vector<float> sampler::distribution(std::span<const float> logits, std::span<const std::int32_t> context) const {
  if (params_.temperature == 0.0f) return {};
  const std::vector<float> z = penalised(logits, context, params_.repetition_penalty);
  const std::size_t n = z.size();
  std::vector<std::int32_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::size_t keep = n;
  if (params_.top_k > 0 && static_cast<std::size_t>(params_.top_k) < n) keep = static_cast<std::size_t>(params_.top_k);
  std::partial_sort(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(keep), order.end(),
                    [&](std::int32_t a, std::int32_t b) { return z[a] > z[b] || (z[a] == z[b] && a < b); });
  order.resize(keep);
  const float mx = z[static_cast<std::size_t>(order[0])];
  std::vector<double> p(keep);
  double sum = 0;
  for (std::size_t i = 0; i < keep; ++i) sum += (p[i] = std::exp((z[order[i]] - mx) / params_.temperature));
  if (params_.top_p < 1.0f) {  // smallest prefix of the sorted tokens whose mass reaches top_p
    double mass = 0;
    std::size_t cut = keep;
    for (std::size_t i = 0; i < keep; ++i) {
      mass += p[i] / sum;
      if (mass >= params_.top_p) {
        cut = i + 1;
        break;
      }
    }
    keep = cut;
    sum = std::accumulate(p.begin(), p.begin() + static_cast<std::ptrdiff_t>(keep), 0.0);
  }
  std::vector<float> dist(n, 0.0f);
  for (std::size_t i = 0; i < keep; ++i) dist[static_cast<std::size_t>(order[i])] = static_cast<float>(p[i] / sum);
  return dist;
}

std::int32_t sampler::greedy(std::span<const float> logits, std::span<const std::int32_t> context) const {
  if (params_.repetition_penalty == 1.0f) return argmax(logits);
  return argmax(penalised(logits, context, params_.repetition_penalty));
}

std::int32_t sampler::sample(std::span<const float> logits, std::span<const std::int32_t> context) {
  if (params_.temperature == 0.0f) return greedy(logits, context);
  return draw(distribution(logits, context), rng_.uniform());
}

std::int32_t draw(std::span<const float> weights, double u) {
  double acc = 0;
  std::int32_t last = 0;
  for (std::size_t i = 0; i < weights.size(); ++i) {
    if (weights[i] <= 0.0f) continue;
    acc += weights[i];
    last = static_cast<std::int32_t>(i);
    if (u < acc) return last;
  }
  return last;  // rounding left u above the total mass: the last token with mass
}

}  // namespace troupe
