#include "training/optimizer.hpp"

#include <cmath>
#include <map>
#include <stdexcept>

#include "protocol/errors.hpp"

namespace troupe::train {

double learning_rate_at(const optimizer_config& c, std::int64_t step) {
  if (c.warmup_steps > 0 && step <= c.warmup_steps)
    return c.learning_rate * static_cast<double>(step) / static_cast<double>(c.warmup_steps);
  const double span = static_cast<double>(std::max<std::int64_t>(1, c.total_steps - c.warmup_steps));
  const double progress = std::min(1.0, static_cast<double>(step - c.warmup_steps) / span);
  return c.min_learning_rate + 0.5 * (c.learning_rate - c.min_learning_rate) * (1.0 + std::cos(M_PI * progress));
}

double clip_factor(const optimizer_config& c, double norm) {
  if (c.grad_clip <= 0 || norm <= c.grad_clip || !std::isfinite(norm)) return 1.0;
  return c.grad_clip / norm;
}

adamw::adamw(std::deque<parameter<float>>& params) {
  for (auto& p : params) {
    if (p.role == param_role::router_bias) continue;
    slots_.push_back({&p, std::vector<float>(p.value.size(), 0.0f), std::vector<float>(p.value.size(), 0.0f)});
  }
}

double adamw::grad_square_sum() const {
  double sum = 0;
  for (const auto& s : slots_) {
    const auto& p = *s.param;
    const auto cols = p.cols();
    for (std::size_t r = 0; r < static_cast<std::size_t>(p.rows()); ++r) {
      if (p.role == param_role::table && !p.touched[r]) continue;
      const float* g = p.grad.data() + static_cast<std::int64_t>(r) * cols;
      for (std::int64_t j = 0; j < cols; ++j) sum += static_cast<double>(g[j]) * g[j];
    }
  }
  return sum;
}

void adamw::step(const optimizer_config& c, std::int64_t step, double lr, double grad_scale) {
  const float b1 = static_cast<float>(c.beta1), b2 = static_cast<float>(c.beta2);
  const float bias1 = static_cast<float>(1.0 - std::pow(c.beta1, static_cast<double>(step)));
  const float bias2 = static_cast<float>(1.0 - std::pow(c.beta2, static_cast<double>(step)));
  const float rate = static_cast<float>(lr), eps = static_cast<float>(c.epsilon), scale = static_cast<float>(grad_scale);
  for (auto& s : slots_) {
    auto& p = *s.param;
    const float decay = p.role == param_role::matrix ? static_cast<float>(lr * c.weight_decay) : 0.0f;
    const auto cols = p.cols();
    for (std::size_t r = 0; r < static_cast<std::size_t>(p.rows()); ++r) {
      if (p.role == param_role::table && !p.touched[r]) continue;
      const std::size_t begin = r * static_cast<std::size_t>(cols);
      for (std::size_t i = begin; i < begin + static_cast<std::size_t>(cols); ++i) {
        const float g = p.grad[i] * scale;
        s.m[i] = b1 * s.m[i] + (1.0f - b1) * g;
        s.v[i] = b2 * s.v[i] + (1.0f - b2) * g * g;
        const float update = (s.m[i] / bias1) / (std::sqrt(s.v[i] / bias2) + eps);
        p.value[i] -= rate * update + decay * p.value[i];
      }
    }
  }
}

std::vector<named_array> adamw::state() const {
  std::vector<named_array> out;
  for (const auto& s : slots_) {
    out.push_back({s.param->name + ".exp_avg", s.param->shape, s.m});
    out.push_back({s.param->name + ".exp_avg_sq", s.param->shape, s.v});
  }
  return out;
}

void adamw::load_state(const std::vector<named_array>& arrays) {
  std::map<std::string, const named_array*> by_name;
  for (const auto& a : arrays) by_name[a.name] = &a;
  for (auto& s : slots_) {
    for (auto [suffix, dst] : {std::pair{".exp_avg", &s.m}, std::pair{".exp_avg_sq", &s.v}}) {
      auto it = by_name.find(s.param->name + suffix);
      if (it == by_name.end()) throw input_error("optimizer state has no " + s.param->name + suffix);
      if (it->second->values.size() != dst->size())
        throw input_error("optimizer state " + s.param->name + suffix + " has " + std::to_string(it->second->values.size()) +
                          " values, the model needs " + std::to_string(dst->size()));
      *dst = it->second->values;
    }
  }
}

void update_router_bias(parameter<float>& bias, std::span<const std::int64_t> load, double rate) {
  if (load.size() != bias.value.size()) throw std::logic_error("update_router_bias: load size");
  double total = 0;
  for (auto l : load) total += static_cast<double>(l);
  const double mean = total / static_cast<double>(load.size());
  for (std::size_t e = 0; e < load.size(); ++e) {
    const double l = static_cast<double>(load[e]);
    if (l < mean) bias.value[e] += static_cast<float>(rate);
    else if (l > mean) bias.value[e] -= static_cast<float>(rate);
  }
}

}  // namespace troupe::train
