// One pipeline stage of the model for training: a contiguous range of ScMoE blocks, plus the
// embedding when it is the first stage and the final norm, lm_head and loss when it is the last.
// A whole model is the stage that has all three.
//
// Invariant: the stage's parameters are exactly the entries of weight_specs() that its range
// covers, with the same names and shapes, in checkpoint order; activations of a micro-batch
// live from its forward until its backward (or are never kept, for evaluation).
#pragma once

#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "model/config.hpp"
#include "training/layers.hpp"

namespace troupe {
class checkpoint;
}

namespace troupe::train {

/// Which part of the model a stage owns.
struct stage_range {
  std::int64_t first_block = 0, end_block = 0;  // blocks [first_block, end_block)
  bool embedding = true, head = true;

  /// Stage `index` of `num_stages` for a model of `num_layers` blocks (blocks split evenly,
  /// earlier stages taking the remainder).
  static stage_range split(std::int64_t num_layers, std::int64_t num_stages, std::int64_t index);
};

/// A parameter of a stage as the checkpoint names it, and how the optimizer treats it.
struct parameter_spec {
  std::string name;
  shape_t shape;
  param_role role = param_role::matrix;
};
/// The parameters `range` owns, in checkpoint order (weight_specs()).
std::vector<parameter_spec> stage_parameters(const model_config& config, const stage_range& range);

/// Training initialisation of one tensor from `seed` (its own stream, as init-model does):
/// matrices N(0, 1/fan_in) with residual outputs (o_proj, down_proj) scaled by
/// 1/sqrt(2 * num_layers), the token embedding N(0, 1), n-gram tables N(0, 0.02^2), norms 1,
/// router bias 0.
template <class T>
void init_parameter(const std::string& name, param_role role, const shape_t& shape, std::int64_t num_layers,
                    std::uint64_t seed, std::span<T> values);

enum class keep_activations : std::uint8_t { yes, no };

template <class T>
class stage_model {
 public:
  stage_model(const model_config& config, stage_range range);
  stage_model(const stage_model&) = delete;
  stage_model& operator=(const stage_model&) = delete;

  const model_config& config() const { return config_; }
  const stage_range& range() const { return range_; }
  /// This stage's parameters in checkpoint order (addresses are stable).
  std::deque<parameter<T>>& parameters() { return params_; }
  const std::deque<parameter<T>>& parameters() const { return params_; }
  parameter<T>& parameter_named(const std::string& name);

  /// Training initialisation from `seed`: init_parameter() for every tensor.
  void init(std::uint64_t seed);
  /// Values from a checkpoint (any float dtype); shapes are checked by name.
  void load(const checkpoint& ckpt);
  void zero_grad();

  /// Forward of micro-batch `id`: tokens [rows] on the first stage, hidden [rows, H] otherwise.
  /// Returns the stage's output hidden states [rows, H].
  buffer<T> forward(std::int64_t id, std::span<const std::int32_t> tokens, std::span<const T> hidden,
                    const batch_dims& dims, keep_activations keep);
  /// Last stage: the summed loss * weight of micro-batch `id` (targets [rows], < 0 skipped)
  /// over `hidden` (the output of forward); with keep_activations::yes also starts the backward
  /// and returns the gradient for the previous stage in `grad_in` (empty on a single stage).
  double loss(std::int64_t id, std::span<const T> hidden, std::span<const std::int32_t> targets, const batch_dims& dims,
              T weight, keep_activations keep, buffer<T>& grad_in);
  /// The last stage's forward and loss in one call (what a stage that owns the head runs: a GPU
  /// stage keeps the hidden states on its device).
  double forward_loss(std::int64_t id, std::span<const std::int32_t> tokens, std::span<const T> hidden,
                      std::span<const std::int32_t> targets, const batch_dims& dims, T weight, keep_activations keep,
                      buffer<T>& grad_in) {
    return loss(id, forward(id, tokens, hidden, dims, keep), targets, dims, weight, keep, grad_in);
  }
  /// Backward of micro-batch `id` from the gradient of its output; returns the gradient of its
  /// input (empty on the first stage) and frees its activations.
  buffer<T> backward(std::int64_t id, std::span<const T> grad_out, const batch_dims& dims);
  /// Micro-batches with activations held.
  std::size_t activations_held() const { return saved_.size(); }

  /// Tokens each router expert of each owned block took since the last reset (balancing).
  const std::vector<std::vector<std::int64_t>>& expert_load() const { return expert_load_; }
  void reset_expert_load();
  /// Adds loads of the same shape as expert_load() (the all-reduced loads of every replica).
  void add_expert_load(const std::vector<std::vector<std::int64_t>>& load);

 private:
  struct block {
    rms_norm_layer<T> input_norm[2], post_norm[2];
    mla_layer<T> attention[2];
    swiglu_layer<T> mlp[2];
    moe_layer<T> moe;
  };
  struct block_cache {
    typename rms_norm_layer<T>::cache in_norm[2], post_norm[2];
    typename mla_layer<T>::cache attention[2];
    typename swiglu_layer<T>::cache mlp[2];
    typename moe_layer<T>::cache moe;
  };
  struct saved {
    typename embedding_layer<T>::cache embedding;
    std::vector<block_cache> blocks;
  };

  buffer<T> block_forward(const block& b, std::span<const T> h, const batch_dims& dims, block_cache& c) const;
  buffer<T> block_backward(const block& b, std::span<const T> dy, const batch_dims& dims, const block_cache& c) const;
  const rope_table<T>& rope_for(const batch_dims& dims);

  model_config config_;
  stage_range range_;
  std::deque<parameter<T>> params_;
  std::map<std::string, parameter<T>*> by_name_;
  embedding_layer<T> embedding_;
  std::vector<block> blocks_;
  head_layer<T> head_;
  std::map<std::int64_t, saved> saved_;
  std::vector<std::vector<std::int64_t>> expert_load_;
  std::int64_t rope_seq_len_ = -1, rope_sequences_ = -1;
  std::unique_ptr<rope_table<T>> rope_;
  T softmax_scale_ = 1;
};

}  // namespace troupe::train
