// A training run: the config file, and the coordinator that spawns the data and stage actors
// (replicas x pipeline stages), drives each optimizer step (micro-batches forward and back,
// all-reduce, clipping, update), evaluates, logs and checkpoints.
//
// Invariant: a run resumed from a checkpoint takes exactly the steps the uninterrupted run
// would have taken from there (same data order, weights, moments and learning rates), so on
// the CPU its losses are bitwise equal.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>

#include "gpu/dtype.hpp"
#include "model/config.hpp"
#include "training/dataset.hpp"
#include "training/optimizer.hpp"

namespace troupe::train {

struct train_config {
  std::filesystem::path file;  // where it was read from
  model_config model;
  std::filesystem::path tokenizer;
  corpus_options data;
  std::int64_t batch_sequences = 16;  // per optimizer step, over all replicas
  std::int64_t micro_batches = 1;     // per replica per step
  std::int64_t steps = 100;
  std::uint64_t seed = 1;
  optimizer_config optimizer;
  std::int64_t stages = 1, replicas = 1;
  std::filesystem::path out;
  std::int64_t checkpoint_every = 0;  // 0: only at the end
  std::int64_t eval_every = 0;        // 0: only at the end
  std::int64_t eval_sequences = 16;
  std::int64_t log_every = 1;         // metrics lines (and progress updates without a terminal)
  dtype save_type = dtype::bf16;      // model.safetensors; master weights stay float32 in trainer_state
  std::string device = "cpu";         // stage actors compute on: cpu, cuda (stage actor i on GPU i mod count), cuda:N
  std::string gemm_math = "tf32";     // the GPU stages' GEMMs: tf32 or f32
};

/// Reads and validates a training config (JSON; relative paths are relative to the file).
train_config load_train_config(const std::filesystem::path& path);

struct train_options {
  bool resume = false;                 // continue from out/latest
  std::optional<std::int64_t> steps;   // overrides the config's total (the schedule keeps the config's)
  bool progress = true;                // progress bar on stderr
  std::optional<std::string> device;   // overrides the config's device
};

struct train_summary {
  std::int64_t first_step = 0, last_step = 0;
  double last_loss = 0, validation_loss = 0;
  double tokens_per_second = 0;
  double bubble_fraction = 0;  // 1 - mean stage busy time / time in optimizer steps, replica 0
  double seconds = 0;
  std::filesystem::path checkpoint;
};

/// Runs (or resumes) the training the config describes. Throws input_error on bad input.
train_summary run_training(const train_config& config, const train_options& options);

}  // namespace troupe::train
