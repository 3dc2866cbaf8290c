#include "model/rope.hpp"

#include <algorithm>
#include <cmath>

#include "model/config.hpp"

namespace troupe {
namespace {

double yarn_mscale(double factor, double mscale) { return factor <= 1 ? 1.0 : 0.1 * mscale * std::log(factor) + 1.0; }

// Dimension index at which a frequency completes `rotations` turns over the original context.
double correction_dim(double rotations, double dim, double base, double max_pos) {
  return dim * std::log(max_pos / (rotations * 2 * M_PI)) / (2 * std::log(base));
}

}  // namespace

rope_params make_rope_params(const model_config& c) {
  const auto dim = c.qk_rope_head_dim;
  const auto half = dim / 2;
  const auto base = static_cast<float>(c.rope_theta);
  rope_params p;
  p.inv_freq.resize(static_cast<std::size_t>(half));
  std::vector<float> pos_freq(static_cast<std::size_t>(half));
  for (std::int64_t i = 0; i < half; ++i)
    pos_freq[i] = std::pow(base, static_cast<float>(2 * i) / static_cast<float>(dim));
  const auto& s = c.rope_scaling;
  if (s.type != "yarn") {
    for (std::int64_t i = 0; i < half; ++i) p.inv_freq[i] = 1.0f / pos_freq[i];
    return p;
  }
  const auto factor = static_cast<float>(s.factor);
  double low = correction_dim(s.beta_fast, static_cast<double>(dim), c.rope_theta, s.original_max_position_embeddings);
  double high = correction_dim(s.beta_slow, static_cast<double>(dim), c.rope_theta, s.original_max_position_embeddings);
  if (s.truncate) {
    low = std::floor(low);
    high = std::ceil(high);
  }
  low = std::max(low, 0.0);
  high = std::min(high, static_cast<double>(dim - 1));
  if (low == high) high += 0.001;  // as the reference: avoids a zero-width ramp
  for (std::int64_t i = 0; i < half; ++i) {
    const float ramp = std::clamp(static_cast<float>((static_cast<double>(i) - low) / (high - low)), 0.0f, 1.0f);
    const float extrapolation_weight = 1.0f - ramp;
    const float extrapolated = 1.0f / pos_freq[i];
    const float interpolated = 1.0f / (factor * pos_freq[i]);
    p.inv_freq[i] = interpolated * (1.0f - extrapolation_weight) + extrapolated * extrapolation_weight;
  }
  if (s.attention_factor) p.attention_factor = static_cast<float>(*s.attention_factor);
  else if (s.mscale && s.mscale_all_dim)
    p.attention_factor = static_cast<float>(yarn_mscale(s.factor, s.mscale) / yarn_mscale(s.factor, s.mscale_all_dim));
  else
    p.attention_factor = static_cast<float>(yarn_mscale(s.factor, 1.0));
  return p;
}

float mla_softmax_scale(const model_config& c) {
  double scale = std::pow(static_cast<double>(c.qk_head_dim()), -0.5);
  if (c.rope_scaling.type == "yarn" && c.rope_scaling.mscale_all_dim) {
    const double m = yarn_mscale(c.rope_scaling.factor, c.rope_scaling.mscale_all_dim);
    scale *= m * m;
  }
  return static_cast<float>(scale);
}

}  // namespace troupe
