// One pipeline stage of the model trained on a GPU: the same stage as train::stage_model<float>
// (same parameters, same forward and backward, same interface: hidden states and gradients in
// and out as host arrays) with its parameters, gradients, AdamW moments and activations in
// device memory. GEMMs go to cuBLAS (float32 storage; `gemm_math` picks float32 or TF32 tensor
// cores); the element-wise and row-wise pieces are train_kernels.cu. Attention keeps only
// each row's log-sum-exp and recomputes the probabilities in the backward, one sequence at a
// time; the head computes lm_head and the cross-entropy in chunks of rows, so neither the
// attention probabilities of a whole batch nor its full logits ever exist.
//
// Invariant: the same math as the CPU stage (tests/cuda/training_test.cpp compares losses,
// every gradient and an AdamW step); the routing follows the inference rule, so a trained
// checkpoint serves as trained.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "model/config.hpp"
#include "training/optimizer.hpp"
#include "training/stage_compute.hpp"
#include "training/stage_model.hpp"

namespace troupe::train {

/// How the stage's GEMMs use the tensor cores (storage is float32 either way). bf16 operands are
/// not offered yet: converting each float32 activation for its GEMM cost more than the faster
/// GEMMs saved (bench/RESULTS.md); that needs the kernels that produce GEMM operands to write bf16.
enum class gemm_math : std::uint8_t {
  f32,   // float32 CUDA cores (the reference the tests hold the GPU to)
  tf32,  // TF32 tensor cores, float32 accumulation (the default)
};
/// "f32" or "tf32"; anything else is an input_error.
gemm_math parse_gemm_math(const std::string& name);

class cuda_stage final : public stage_compute {
 public:
  /// On GPU `device`; with a device group, rank `rank` of its replicas' NCCL all-reduce.
  cuda_stage(const model_config& config, stage_range range, gemm_math math, int device = 0,
             std::shared_ptr<device_group> group = nullptr, int rank = 0);
  ~cuda_stage() override;
  cuda_stage(const cuda_stage&) = delete;
  cuda_stage& operator=(const cuda_stage&) = delete;

  const model_config& config() const;
  const stage_range& range() const;
  /// The stage's parameters (names, shapes, roles) in checkpoint order.
  const std::vector<parameter_spec>& parameters() const override;
  std::int64_t parameter_count() const;

  /// stage_model::init's values (init_parameter), made on the host and uploaded.
  void init(std::uint64_t seed) override;
  /// Values by name; every parameter of the stage must be there with its shape.
  void set_values(const std::vector<named_array>& values) override;
  std::vector<named_array> values() const override;
  /// Gradients by name (tables: every row; untouched rows are 0), and each table's touched rows.
  std::vector<named_array> gradients() const override;
  std::vector<std::vector<std::uint8_t>> touched() const override;
  /// Adds (or overwrites with) gradients and touched rows of the layout gradients() gives: the
  /// all-reduce between replicas.
  void add_gradients(const std::vector<named_array>& grads, const std::vector<std::vector<std::uint8_t>>& touched,
                     bool overwrite) override;

  /// stage_model<float>'s forward, loss and backward (the same contracts).
  std::vector<float> forward(std::int64_t id, std::span<const std::int32_t> tokens, std::span<const float> hidden,
                             const batch_dims& dims, keep_activations keep) override;
  double loss(std::int64_t id, std::span<const float> hidden, std::span<const std::int32_t> targets,
              const batch_dims& dims, float weight, keep_activations keep, std::vector<float>& grad_in) override;
  std::vector<float> backward(std::int64_t id, std::span<const float> grad_out, const batch_dims& dims) override;
  /// The last stage's forward and loss in one (stage_model::forward_loss): the hidden states stay
  /// on the device.
  double forward_loss(std::int64_t id, std::span<const std::int32_t> tokens, std::span<const float> hidden,
                      std::span<const std::int32_t> targets, const batch_dims& dims, float weight, keep_activations keep,
                      std::vector<float>& grad_in) override;
  std::size_t activations_held() const;

  void zero_grad() override;
  /// Sum of squared gradients (adamw::grad_square_sum: untouched table rows hold 0).
  bool reduces_on_device() const override;
  void all_reduce() override;
  double grad_square_sum() const override;
  /// adamw::step on the device: moments and values of every parameter but router biases in one
  /// fused pass each; table rows no micro-batch touched are left alone.
  void step(const optimizer_config& config, std::int64_t step, double lr, double grad_scale) override;
  /// update_router_bias() for every owned block from expert_load().
  void update_router_biases(double rate) override;
  /// Moments as adamw::state() names them, and their restore.
  std::vector<named_array> optimizer_state() const override;
  void load_optimizer_state(const std::vector<named_array>& arrays) override;

  const std::vector<std::vector<std::int64_t>>& expert_load() const override;
  void reset_expert_load() override;
  void add_expert_load(const std::vector<std::vector<std::int64_t>>& load) override;

  /// Bytes of device memory in use on the stage's device now (all of it, not only this stage's).
  std::size_t device_bytes() const;

  struct impl;

 private:
  std::unique_ptr<impl> impl_;
};

}  // namespace troupe::train
