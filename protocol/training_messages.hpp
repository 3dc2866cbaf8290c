// The messages of the training pipeline, as plain data (no CAF here). Micro-batches flow
// forward through the stages of a replica and gradients flow back; the stages of one depth in
// every replica exchange gradient shares to all-reduce them.
// Invariant: a message carries its step, micro-batch id and shape, so a stage can act on it
// alone, and every buffer is plain host data (serializable across processes).
#pragma once

#include <cstdint>
#include <vector>

#include "training/optimizer.hpp"

namespace troupe {

/// One micro-batch on its way forward: tokens for the first stage, hidden states after it.
struct train_micro_batch {
  std::int64_t step = 0, id = 0;
  std::int64_t sequences = 0, seq_len = 0;  // rows = sequences * seq_len
  std::vector<std::int32_t> tokens;         // [rows] inputs (first stage only)
  std::vector<std::int32_t> targets;        // [rows] next tokens, read by the last stage (-1: no loss)
  std::vector<float> hidden;                // [rows, H] output of the previous stage
  float loss_weight = 0;                    // 1 / target tokens of the whole step (all replicas)
  bool evaluate = false;                    // validation: forward and loss only, nothing kept
};

/// The gradient of a micro-batch's hidden states, on its way back.
struct train_gradient {
  std::int64_t step = 0, id = 0;
  std::int64_t sequences = 0, seq_len = 0;
  std::vector<float> grad;  // [rows, H]
};

/// What the last stage reports for each micro-batch (to the coordinator).
struct micro_batch_loss {
  std::int64_t step = 0, id = 0, replica = 0;
  double loss_sum = 0;  // sum of token losses * loss_weight
  std::int64_t target_tokens = 0;
  bool evaluate = false;
};

/// A replica's gradients of one stage (and its router loads) for the all-reduce, and the sum
/// sent back.
struct gradient_share {
  std::int64_t step = 0, replica = 0;
  std::vector<float> grads;           // every parameter's gradient, in parameter order
  std::vector<std::uint8_t> touched;  // every table's touched rows, in parameter order
  std::vector<std::int64_t> load;     // per owned block, per router expert
};

/// The optimizer step the coordinator decides after the all-reduce.
struct step_update {
  std::int64_t step = 0;
  double learning_rate = 0, grad_scale = 1;
};

/// What the data actor read: sizes and the fingerprint that resuming checks.
struct corpus_info {
  std::int64_t tokens = 0, train_sequences = 0, validation_sequences = 0;
  std::uint64_t fingerprint = 0;
};

/// A stage's state for a checkpoint: float32 master values and AdamW moments.
struct stage_snapshot {
  std::vector<train::named_array> values, moments;
};

}  // namespace troupe
