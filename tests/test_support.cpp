#include "tests/test_support.hpp"

#include <simdjson.h>
#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <vector>

#include "model/init_model.hpp"
#include "model/sampler.hpp"

#include <cstdlib>

namespace troupe::test {

std::filesystem::path temp_dir(const std::string& name) {
  // Per process: ctest runs test cases in parallel processes, and a model directory rewritten
  // under another process's memory map would crash it.
  // TROUPE_TEST_TMP moves them (the GPU machine runs binaries built elsewhere).
  const char* root = std::getenv("TROUPE_TEST_TMP");
  const auto p = (root ? std::filesystem::path(root) : std::filesystem::path(TROUPE_BINARY_DIR) / "test-tmp") /
                 (name + "-" + std::to_string(getpid()));
  std::filesystem::remove_all(p);
  std::filesystem::create_directories(p);
  return p;
}

std::string tiny_config_json(const std::string& overrides, bool ngram) {
  // Base fields in order; an override replaces a field's value or adds a field.
  std::vector<std::pair<std::string, std::string>> fields = {
      {"architectures", ngram ? R"(["LongcatFlashNgramForCausalLM"])" : R"(["LongcatFlashForCausalLM"])"},
      {"vocab_size", "97"}, {"hidden_size", "48"}, {"num_layers", "2"}, {"num_attention_heads", "3"},
      {"emb_neighbor_num", "3"}, {"emb_split_num", "2"}, {"ngram_vocab_size_ratio", "3"},
      {"q_lora_rank", "24"}, {"kv_lora_rank", "16"}, {"qk_nope_head_dim", "8"}, {"qk_rope_head_dim", "4"},
      {"v_head_dim", "8"}, {"ffn_hidden_size", "40"}, {"expert_ffn_hidden_size", "12"}, {"n_routed_experts", "6"},
      {"zero_expert_num", "2"}, {"moe_topk", "3"}, {"routed_scaling_factor", "2.5"}, {"rms_norm_eps", "1e-5"},
      {"rope_theta", "10000.0"}, {"bos_token_id", "1"}, {"eos_token_id", "2"}};
  if (!overrides.empty()) {
    simdjson::dom::parser parser;
    simdjson::padded_string text("{" + overrides + "}");
    simdjson::dom::object obj = parser.parse(text).get_object().value();
    for (auto [key, value] : obj) {
      const std::string k(key), v = simdjson::minify(value);
      auto it = std::find_if(fields.begin(), fields.end(), [&](const auto& f) { return f.first == k; });
      if (it == fields.end()) fields.emplace_back(k, v);
      else it->second = v;
    }
  }
  std::string json = "{";
  for (const auto& [k, v] : fields) {
    if (v == "\"absent\"") continue;  // lets a test drop a field
    json += (json.size() > 1 ? ",\n\"" : "\"") + k + "\": " + v;
  }
  return json + "}";
}

model_config tiny_config(const std::string& overrides, bool ngram) {
  return parse_model_config(tiny_config_json(overrides, ngram), "tiny-config");
}

std::filesystem::path make_model(const std::string& name, const model_config& config, std::uint64_t seed, dtype weights) {
  const auto dir = temp_dir(name);
  init_options o;
  o.seed = seed;
  o.weight_type = weights;
  init_model(config, dir, o);
  return dir;
}

std::pair<double, int> two_sample_chi_square(const std::map<std::int32_t, int>& a, const std::map<std::int32_t, int>& b,
                                             int min_count) {
  double x = 0;
  int df = -1;
  for (const auto& [key, na] : a) {
    const auto it = b.find(key);
    const int nb = it == b.end() ? 0 : it->second;
    if (na + nb < min_count) continue;
    x += static_cast<double>((na - nb) * (na - nb)) / (na + nb);
    ++df;
  }
  return {x, df};
}

double relative_l2(const float* a, const float* b, std::size_t n) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < n; ++i) {
    num += (static_cast<double>(a[i]) - b[i]) * (static_cast<double>(a[i]) - b[i]);
    den += static_cast<double>(b[i]) * b[i];
  }
  return std::sqrt(num / (den > 0 ? den : 1));
}

training_batch random_training_batch(const model_config& c, std::int64_t sequences, std::int64_t seq_len,
                                     std::uint64_t seed) {
  training_batch b{{sequences, seq_len}, {}, {}};
  rng gen(seed);
  for (std::int64_t i = 0; i < b.dims.rows(); ++i) {
    b.tokens.push_back(static_cast<std::int32_t>(gen.next() % static_cast<std::uint64_t>(c.vocab_size)));
    b.targets.push_back(static_cast<std::int32_t>(gen.next() % static_cast<std::uint64_t>(c.vocab_size)));
  }
  b.tokens[3] = c.eos_token_id;
  b.targets[5] = -1;
  return b;
}

}  // namespace troupe::test
