// Helpers shared by the unit tests: small model configs, temporary directories, random
// model directories, and a relative-L2 comparison.
#pragma once

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <map>
#include <utility>
#include <string>

#include <vector>

#include "gpu/tensor.hpp"
#include "model/config.hpp"
#include "training/layers.hpp"

namespace troupe::test {

/// A fresh, empty directory under the build tree (or $TROUPE_TEST_TMP) for this process,
/// emptied at each use.
std::filesystem::path temp_dir(const std::string& name);

/// A small n-gram config JSON with `overrides` merged in ("\"key\": value" pairs).
std::string tiny_config_json(const std::string& overrides = "", bool ngram = true);
model_config tiny_config(const std::string& overrides = "", bool ngram = true);

/// Writes a random-weight model directory for `config` and returns its path.
std::filesystem::path make_model(const std::string& name, const model_config& config, std::uint64_t seed = 1,
                                 dtype weights = dtype::bf16);

/// Two-sample chi-square statistic between two histograms over the keys of `a` seen at least
/// `min_count` times in both together, and its degrees of freedom (those keys - 1).
std::pair<double, int> two_sample_chi_square(const std::map<std::int32_t, int>& a, const std::map<std::int32_t, int>& b,
                                             int min_count);

/// A training micro-batch of random tokens and targets, with an EOS inside (the n-gram hash
/// restarts after it) and one ignored target (-1).
struct training_batch {
  train::batch_dims dims;
  std::vector<std::int32_t> tokens, targets;
};
training_batch random_training_batch(const model_config& c, std::int64_t sequences, std::int64_t seq_len,
                                     std::uint64_t seed);

/// ||a - b|| / ||b|| over float32 tensors of equal size.
double relative_l2(const float* a, const float* b, std::size_t n);

}  // namespace troupe::test
