// The CPU training stage: stage_model<float> (OpenBLAS GEMMs) with adamw, as a stage_compute.
#pragma once

#include "training/checkpoint_io.hpp"
#include "training/stage_compute.hpp"

namespace troupe::train {

class cpu_stage final : public stage_compute {
 public:
  cpu_stage(const model_config& config, const stage_range& range);

  const std::vector<parameter_spec>& parameters() const override { return specs_; }
  void init(std::uint64_t seed) override { model_.init(seed); }
  void set_values(const std::vector<named_array>& values) override;
  std::vector<named_array> values() const override { return values_of(model_); }

  std::vector<float> forward(std::int64_t id, std::span<const std::int32_t> tokens, std::span<const float> hidden,
                             const batch_dims& dims, keep_activations keep) override {
    return model_.forward(id, tokens, hidden, dims, keep);
  }
  double loss(std::int64_t id, std::span<const float> hidden, std::span<const std::int32_t> targets,
              const batch_dims& dims, float weight, keep_activations keep, std::vector<float>& grad_in) override {
    return model_.loss(id, hidden, targets, dims, weight, keep, grad_in);
  }
  double forward_loss(std::int64_t id, std::span<const std::int32_t> tokens, std::span<const float> hidden,
                      std::span<const std::int32_t> targets, const batch_dims& dims, float weight, keep_activations keep,
                      std::vector<float>& grad_in) override {
    return model_.forward_loss(id, tokens, hidden, targets, dims, weight, keep, grad_in);
  }
  std::vector<float> backward(std::int64_t id, std::span<const float> grad_out, const batch_dims& dims) override {
    return model_.backward(id, grad_out, dims);
  }

  std::vector<named_array> gradients() const override;
  std::vector<std::vector<std::uint8_t>> touched() const override;
  void add_gradients(const std::vector<named_array>& grads, const std::vector<std::vector<std::uint8_t>>& touched,
                     bool overwrite) override;
  double grad_square_sum() const override { return optimizer_.grad_square_sum(); }
  void step(const optimizer_config& config, std::int64_t step, double lr, double grad_scale) override {
    optimizer_.step(config, step, lr, grad_scale);
  }
  void update_router_biases(double rate) override;
  void zero_grad() override { model_.zero_grad(); }
  std::vector<named_array> optimizer_state() const override { return optimizer_.state(); }
  void load_optimizer_state(const std::vector<named_array>& arrays) override { optimizer_.load_state(arrays); }

  const std::vector<std::vector<std::int64_t>>& expert_load() const override { return model_.expert_load(); }
  void reset_expert_load() override { model_.reset_expert_load(); }
  void add_expert_load(const std::vector<std::vector<std::int64_t>>& load) override { model_.add_expert_load(load); }

 private:
  stage_model<float> model_;
  adamw optimizer_;
  std::vector<parameter_spec> specs_;
};

}  // namespace troupe::train
