// Creates a model directory with random weights in the released key layout: config.json,
// safetensors (sharded past a size) and tokenizer.json. Tests and benchmarks build on it.
// Invariant: the same config and seed give byte-identical files on every machine (each tensor
// draws from its own stream seeded by the seed and its name).
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>

#include "gpu/dtype.hpp"

namespace troupe {

struct model_config;

struct init_options {
  std::uint64_t seed = 0;
  dtype weight_type = dtype::bf16;              // the router always stays float32
  std::uint64_t max_shard_bytes = 2ull << 30;
  std::filesystem::path tokenizer_file;         // copied as tokenizer.json; empty: none
};

/// The random stream seed of tensor `name` under `seed` (init-model and training init).
std::uint64_t tensor_seed(std::uint64_t seed, const std::string& name);

void init_model(const model_config& config, const std::filesystem::path& out, const init_options& options);

}  // namespace troupe
