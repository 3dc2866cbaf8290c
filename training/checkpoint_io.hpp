// Training checkpoints: the Hugging Face model files that `troupe serve` and `generate` load
// (config.json, model.safetensors, tokenizer.json), plus trainer_state.safetensors (float32
// master weights and AdamW moments) and trainer_state.json (step, data position, seed).
//
// Invariant: a checkpoint directory appears under its final name only when every file of it
// is complete (it is written as step-N.tmp and renamed), and `latest` names a complete one;
// a failed save (disk full) removes its partial directory and leaves the previous intact.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "gpu/dtype.hpp"
#include "model/config.hpp"
#include "training/optimizer.hpp"
#include "training/stage_model.hpp"

namespace troupe::train {

/// A stage's parameter values as named arrays.
std::vector<named_array> values_of(const stage_model<float>& stage);

/// Writes config.json, model.safetensors (matrices in `type`, the router in float32) and, when
/// given, tokenizer.json into `dir`. `values` must hold every tensor of the config.
void write_model_files(const std::filesystem::path& dir, const model_config& config, const std::vector<named_array>& values,
                       dtype type, const std::filesystem::path& tokenizer);

/// Where training stands, saved with each checkpoint.
struct trainer_state {
  std::int64_t step = 0;            // optimizer steps done
  std::int64_t epoch = 0;           // data passes started
  std::int64_t position = 0;        // next sequence of the epoch's order
  std::int64_t tokens_seen = 0;
  std::uint64_t seed = 0;
  std::uint64_t data_fingerprint = 0;  // of the tokenized corpus, to refuse resuming on other data
};

struct checkpoint_contents {
  model_config config;
  std::vector<named_array> values;   // float32 master weights
  std::vector<named_array> moments;  // AdamW state
  trainer_state state;
};

/// Saves into `run_dir`/checkpoints/step-NNNNNN and points `run_dir`/latest at it; returns the
/// directory. Throws input_error (naming the cause) if any file cannot be written.
std::filesystem::path save_checkpoint(const std::filesystem::path& run_dir, const checkpoint_contents& contents,
                                      dtype model_type, const std::filesystem::path& tokenizer);
/// Loads a checkpoint directory written by save_checkpoint.
checkpoint_contents load_checkpoint(const std::filesystem::path& dir);
/// The checkpoint `run_dir`/latest names, if any.
std::optional<std::filesystem::path> latest_checkpoint(const std::filesystem::path& run_dir);

}  // namespace troupe::train
