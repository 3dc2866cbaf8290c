#include "model/init_model.hpp"

#include <unistd.h>

#include <cmath>
#include <fstream>
#include <iostream>

#include "model/config.hpp"
#include "model/safetensors.hpp"
#include "model/sampler.hpp"
#include "model/weights.hpp"
#include "protocol/errors.hpp"
#include "tokenizer/tokenizer.hpp"

namespace troupe {
namespace {

tensor random_tensor(const weight_spec& spec, std::uint64_t seed, dtype type) {
  rng gen(tensor_seed(seed, spec.name));
  tensor f = tensor::empty(spec.shape, dtype::f32);
  float* p = f.data<float>();
  const double fan_in = static_cast<double>(spec.shape.back());
  for (std::int64_t i = 0, n = f.numel(); i < n; ++i) {
    const double z = gen.normal();
    switch (spec.init) {
      case weight_init::matrix: p[i] = static_cast<float>(z / std::sqrt(fan_in)); break;
      case weight_init::embedding: p[i] = static_cast<float>(z); break;
      case weight_init::norm: p[i] = static_cast<float>(1.0 + 0.1 * z); break;
      case weight_init::bias: p[i] = static_cast<float>(0.01 * z); break;
    }
  }
  if (type == dtype::f32 || spec.keep_f32) return f;
  tensor out = tensor::empty(spec.shape, type);
  convert_from_f32(type, p, out.raw(), static_cast<std::size_t>(f.numel()));
  return out;
}

}  // namespace

std::uint64_t tensor_seed(std::uint64_t seed, const std::string& name) {
  std::uint64_t h = 0xcbf29ce484222325ull;  // FNV-1a of the name
  for (unsigned char c : name) h = (h ^ c) * 0x100000001b3ull;
  return seed ^ h;
}

void init_model(const model_config& config, const std::filesystem::path& out, const init_options& options) {
  if (options.weight_type != dtype::f32 && options.weight_type != dtype::bf16 && options.weight_type != dtype::f16)
    throw input_error("init-model: weights must be f32, bf16 or f16");
  if (!options.tokenizer_file.empty()) {
    const tokenizer tok = tokenizer::load(options.tokenizer_file);
    if (tok.vocab_size() > config.vocab_size)
      throw input_error("init-model: the tokenizer " + options.tokenizer_file.string() + " has " +
                        std::to_string(tok.vocab_size()) + " ids but the config's vocab_size is " +
                        std::to_string(config.vocab_size));
  }
  std::filesystem::create_directories(out);
  const auto specs = weight_specs(config);
  const bool show_progress = specs.size() >= 20 && isatty(2);
  std::vector<std::pair<std::string, tensor>> tensors;
  std::uint64_t bytes = 0;
  for (std::size_t i = 0; i < specs.size(); ++i) {
    tensors.emplace_back(specs[i].name, random_tensor(specs[i], options.seed, options.weight_type));
    bytes += tensors.back().second.nbytes();
    if (show_progress && (i + 1) % (specs.size() / 20) == 0)
      std::cerr << "\r[init-model] " << (100 * (i + 1) / specs.size()) << "% of " << specs.size() << " tensors" << std::flush;
  }
  if (show_progress) std::cerr << "\n";
  write_checkpoint(out, tensors, options.max_shard_bytes);
  {
    std::ofstream cfg(out / "config.json");
    cfg << model_config_to_json(config);
    if (!cfg) throw input_error((out / "config.json").string() + ": write failed");
  }
  if (!options.tokenizer_file.empty()) {
    std::filesystem::copy_file(options.tokenizer_file, out / "tokenizer.json",
                               std::filesystem::copy_options::overwrite_existing);
  }
  std::cerr << "[init-model] wrote " << specs.size() << " tensors (" << bytes / 1e6 << " MB, "
            << dtype_name(options.weight_type) << ") to " << out.string() << "\n";
}

}  // namespace troupe
