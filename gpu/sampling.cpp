#include "gpu/sampling.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <unordered_set>

namespace troupe {

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

std::vector<float> sampling_distribution(std::span<const float> logits, std::span<const std::int32_t> context,
                                         const sampling_params& params) {
  if (params.temperature == 0.0f) return {};
  const std::vector<float> z = penalised(logits, context, params.repetition_penalty);
  const std::size_t n = z.size();
  std::vector<std::int32_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::size_t keep = n;
  if (params.top_k > 0 && static_cast<std::size_t>(params.top_k) < n) keep = static_cast<std::size_t>(params.top_k);
  std::partial_sort(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(keep), order.end(),
                    [&](std::int32_t a, std::int32_t b) { return z[a] > z[b] || (z[a] == z[b] && a < b); });
  order.resize(keep);
  const float mx = z[static_cast<std::size_t>(order[0])];
  std::vector<double> p(keep);
  double sum = 0;
  for (std::size_t i = 0; i < keep; ++i) sum += (p[i] = std::exp((z[order[i]] - mx) / params.temperature));
  if (params.top_p < 1.0f) {  // smallest prefix of the sorted tokens whose mass reaches top_p
    double mass = 0;
    std::size_t cut = keep;
    for (std::size_t i = 0; i < keep; ++i) {
      mass += p[i] / sum;
      if (mass >= params.top_p) {
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

std::int32_t greedy_token(std::span<const float> logits, std::span<const std::int32_t> context, float repetition_penalty) {
  if (repetition_penalty == 1.0f) return argmax(logits);
  return argmax(penalised(logits, context, repetition_penalty));
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

std::int32_t sample_token(std::span<const float> row, const token_draw& d) {
  if (d.params.temperature == 0.0f) return greedy_token(row, d.context, d.params.repetition_penalty);
  return draw(sampling_distribution(row, d.context, d.params), d.u);
}

}  // namespace troupe
