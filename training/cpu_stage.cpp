#include "training/cpu_stage.hpp"

#include <map>

#include "protocol/errors.hpp"

namespace troupe::train {

cpu_stage::cpu_stage(const model_config& config, const stage_range& range)
    : model_(config, range), optimizer_(model_.parameters()), specs_(stage_parameters(config, range)) {}

void cpu_stage::set_values(const std::vector<named_array>& values) {
  std::map<std::string, const named_array*> by_name;
  for (const auto& v : values) by_name[v.name] = &v;
  for (auto& p : model_.parameters()) {
    auto it = by_name.find(p.name);
    if (it == by_name.end() || it->second->shape != p.shape)
      throw input_error("the checkpoint has no tensor " + p.name + " of the model's shape " + shape_to_string(p.shape));
    p.value = it->second->values;
  }
}

std::vector<named_array> cpu_stage::gradients() const {
  std::vector<named_array> out;
  for (const auto& p : model_.parameters())
    if (p.role != param_role::router_bias) out.push_back({p.name, p.shape, p.grad});
  return out;
}

std::vector<std::vector<std::uint8_t>> cpu_stage::touched() const {
  std::vector<std::vector<std::uint8_t>> out;
  for (const auto& p : model_.parameters())
    if (p.role == param_role::table) out.push_back(p.touched);
  return out;
}

void cpu_stage::add_gradients(const std::vector<named_array>& grads, const std::vector<std::vector<std::uint8_t>>& touched,
                              bool overwrite) {
  std::size_t gi = 0, ti = 0;
  for (auto& p : model_.parameters()) {
    if (p.role == param_role::router_bias) continue;
    const auto& src = grads.at(gi++);
    if (src.name != p.name || src.values.size() != p.grad.size())
      throw std::logic_error("cpu_stage::add_gradients: " + src.name + " does not match " + p.name);
    for (std::size_t i = 0; i < p.grad.size(); ++i) p.grad[i] = overwrite ? src.values[i] : p.grad[i] + src.values[i];
    if (p.role == param_role::table) {
      const auto& theirs = touched.at(ti++);
      for (std::size_t r = 0; r < p.touched.size(); ++r) p.touched[r] = overwrite ? theirs.at(r) : (p.touched[r] | theirs.at(r));
    }
  }
}

void cpu_stage::update_router_biases(double rate) {
  const auto& load = model_.expert_load();
  for (std::size_t b = 0; b < load.size(); ++b)
    update_router_bias(model_.parameter_named("model.layers." + std::to_string(model_.range().first_block + static_cast<std::int64_t>(b)) +
                                              ".mlp.router.e_score_correction_bias"),
                       load[b], rate);
}

}  // namespace troupe::train
