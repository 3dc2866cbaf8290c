// What a training stage actor computes with, whatever the device: a stage of the model with its
// optimizer. The CPU implementation (make_stage_compute("cpu")) is stage_model<float> with adamw;
// the GPU one is cuda_stage (training/cuda). The actor (pipeline_actors.cpp) sees only this.
//
// Invariant: the same contracts as stage_model (forward keeps activations by micro-batch id
// until its backward; gradients accumulate until zero_grad) and adamw (step updates every
// parameter but router biases; table rows no micro-batch touched keep values and moments).
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

#include "training/optimizer.hpp"
#include "training/stage_model.hpp"

namespace troupe::train {

/// Same-depth stages of every replica that all-reduce on their devices (NCCL, one GPU each in
/// this process); opaque outside the CUDA stage.
struct device_group;

class stage_compute {
 public:
  virtual ~stage_compute() = default;

  /// The stage's parameters in checkpoint order.
  virtual const std::vector<parameter_spec>& parameters() const = 0;
  /// init_parameter() values from `seed`, or values by name (every parameter, its shape).
  virtual void init(std::uint64_t seed) = 0;
  virtual void set_values(const std::vector<named_array>& values) = 0;
  virtual std::vector<named_array> values() const = 0;

  virtual std::vector<float> forward(std::int64_t id, std::span<const std::int32_t> tokens, std::span<const float> hidden,
                                     const batch_dims& dims, keep_activations keep) = 0;
  virtual double loss(std::int64_t id, std::span<const float> hidden, std::span<const std::int32_t> targets,
                      const batch_dims& dims, float weight, keep_activations keep, std::vector<float>& grad_in) = 0;
  /// forward then loss on the last stage (the hidden states need not leave the device).
  virtual double forward_loss(std::int64_t id, std::span<const std::int32_t> tokens, std::span<const float> hidden,
                              std::span<const std::int32_t> targets, const batch_dims& dims, float weight,
                              keep_activations keep, std::vector<float>& grad_in) = 0;
  virtual std::vector<float> backward(std::int64_t id, std::span<const float> grad_out, const batch_dims& dims) = 0;

  /// Gradients of every parameter but router biases, in order, and the touched rows of each
  /// table; add_gradients() adds (or copies) arrays of that layout: the replicas' all-reduce.
  virtual std::vector<named_array> gradients() const = 0;
  virtual std::vector<std::vector<std::uint8_t>> touched() const = 0;
  virtual void add_gradients(const std::vector<named_array>& grads, const std::vector<std::vector<std::uint8_t>>& touched,
                             bool overwrite) = 0;
  /// Whether all_reduce() sums the replicas' gradients, touched rows and expert loads where they
  /// are (a GPU stage in a device group); otherwise the actors exchange gradients()/add_gradients().
  virtual bool reduces_on_device() const { return false; }
  /// The device all-reduce; every stage of the group calls it for the same step.
  virtual void all_reduce() { throw std::logic_error("stage_compute::all_reduce: not in a device group"); }
  virtual double grad_square_sum() const = 0;
  virtual void step(const optimizer_config& config, std::int64_t step, double lr, double grad_scale) = 0;
  /// update_router_bias() of every owned block from expert_load().
  virtual void update_router_biases(double rate) = 0;
  virtual void zero_grad() = 0;
  virtual std::vector<named_array> optimizer_state() const = 0;
  virtual void load_optimizer_state(const std::vector<named_array>& arrays) = 0;

  /// Tokens each router expert of each owned block took since the last reset (balancing).
  virtual const std::vector<std::vector<std::int64_t>>& expert_load() const = 0;
  virtual void reset_expert_load() = 0;
  virtual void add_expert_load(const std::vector<std::vector<std::int64_t>>& load) = 0;
};

/// Where a stage computes: "cpu", or "cuda" / "cuda:N" where the CUDA stage was built; `math` is
/// the GPU's GEMM math ("tf32" or "f32"). Throws input_error naming what is unknown, not built
/// in, or not present.
std::unique_ptr<stage_compute> make_stage_compute(const model_config& config, const stage_range& range,
                                                  const std::string& device, const std::string& math,
                                                  std::shared_ptr<device_group> group = nullptr, int rank = 0);
/// The device group of stages placed on `devices` (replica order: rank = replica), or null where
/// they cannot all-reduce on their devices: fewer than two, not all on GPUs, no GPU visible, two on one GPU, or a
/// build without NCCL.
std::shared_ptr<device_group> make_device_group(const std::vector<std::string>& devices);
/// The device of stage actor `index` (replica-major) of a run on `device`: "cpu" stays, "cuda"
/// spreads the actors over the visible GPUs (index mod count), "cuda:N" puts all on GPU N.
/// Throws input_error where the device is unknown, not built in, or not present.
std::string place_stage(const std::string& device, std::int64_t index);

}  // namespace troupe::train
