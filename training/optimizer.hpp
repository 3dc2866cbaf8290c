// AdamW with decoupled weight decay, global-norm gradient clipping, linear warmup + cosine
// decay, lazy updates of embedding and n-gram table rows, and the router's auxiliary-loss-free
// balancing bias update (spec: model.md section 5).
//
// Invariant: an update depends only on the parameter values, gradients, moments and the step
// number, all of which a checkpoint holds, so a resumed run repeats the same updates bit for
// bit. Table rows no micro-batch touched keep their values and moments unchanged (lazy Adam).
#pragma once

#include <cstdint>
#include <deque>
#include <span>
#include <string>
#include <vector>

#include "training/layers.hpp"

namespace troupe::train {

struct optimizer_config {
  double learning_rate = 3e-3;      // peak, reached after warmup
  double min_learning_rate = 3e-4;  // end of the cosine
  std::int64_t warmup_steps = 100;
  std::int64_t total_steps = 1000;  // the cosine spans warmup_steps..total_steps
  double beta1 = 0.9, beta2 = 0.95, epsilon = 1e-8;
  double weight_decay = 0.1;        // matrices only; norms and tables are not decayed
  double grad_clip = 1.0;           // max global L2 norm; 0 disables clipping
  double router_bias_rate = 1e-3;   // balancing bias step per optimizer step; 0 disables
};

/// Learning rate of optimizer step `step` (1-based).
double learning_rate_at(const optimizer_config& config, std::int64_t step);
/// Factor that scales gradients of global norm `norm` down to the clip (1 when within it).
double clip_factor(const optimizer_config& config, double norm);

/// A named float array: how parameters and optimizer state leave a stage (checkpoints).
struct named_array {
  std::string name;
  shape_t shape;
  std::vector<float> values;
};

class adamw {
 public:
  /// Moments for every parameter of `params` except router biases.
  explicit adamw(std::deque<parameter<float>>& params);

  /// Sum of squared gradients (touched rows only for tables): this stage's share of the norm.
  double grad_square_sum() const;
  /// One update at step `step` (1-based) with learning rate `lr`; gradients are multiplied by
  /// `grad_scale` (the clip factor) first.
  void step(const optimizer_config& config, std::int64_t step, double lr, double grad_scale);

  /// Moments as named arrays "{name}.exp_avg" / "{name}.exp_avg_sq", and their restore.
  std::vector<named_array> state() const;
  void load_state(const std::vector<named_array>& arrays);

 private:
  struct slot {
    parameter<float>* param;
    std::vector<float> m, v;
  };
  std::vector<slot> slots_;
};

/// The auxiliary-loss-free balancing update: each expert's bias rises by `rate` when it took
/// fewer tokens than the mean of all router experts, and falls by `rate` when it took more.
void update_router_bias(parameter<float>& bias, std::span<const std::int64_t> load, double rate);

}  // namespace troupe::train
