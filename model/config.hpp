// The model configuration: the released `config.json` fields of LongcatFlashNgramForCausalLM
// and LongcatFlashForCausalLM (spec: model.md section 1), validated on load.
// Invariant: a loaded config is internally consistent (every derived size below is valid), so
// layers never re-check it; every problem is reported at load with the field's name.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace troupe {

enum class embedding_kind : std::uint8_t { plain, ngram };

/// The paper's embedding amplification (spec section 2): off in the released model; a Troupe
/// config extension ("embedding_amplification") that training and inference both honour.
enum class amplification : std::uint8_t { none, sqrt_hidden, layer_norm };

/// RoPE scaling, as in `rope_scaling` (released) or `rope_parameters` (transformers 5).
struct rope_scaling_config {
  std::string type = "default";  // "default" or "yarn"
  double factor = 1.0;
  double original_max_position_embeddings = 0;
  double beta_fast = 32, beta_slow = 1;
  double mscale = 0, mscale_all_dim = 0;  // 0 = absent
  std::optional<double> attention_factor;
  bool truncate = true;
};

struct model_config {
  std::string architecture;  // "LongcatFlashNgramForCausalLM" or "LongcatFlashForCausalLM"
  embedding_kind embedding = embedding_kind::ngram;

  std::int64_t vocab_size = 0;         // V
  std::int64_t hidden_size = 0;        // H
  std::int64_t num_layers = 0;         // ScMoE blocks; 2 attention modules each
  std::int64_t num_attention_heads = 0;

  std::int64_t emb_neighbor_num = 0;   // N, n-gram orders 2..N (ngram only)
  std::int64_t emb_split_num = 0;      // K, sub-tables per order
  double ngram_vocab_size_ratio = 0;   // r, m = r * V
  std::vector<std::int64_t> ngram_table_sizes;  // explicit per-table sizes (Troupe extension), or empty
  amplification embedding_amplification = amplification::none;  // "none" | "sqrt_hidden" | "layer_norm"

  std::int64_t q_lora_rank = 0;        // 0: no query LoRA (q_proj)
  std::int64_t kv_lora_rank = 0;
  std::int64_t qk_nope_head_dim = 0, qk_rope_head_dim = 0, v_head_dim = 0;
  bool mla_scale_q_lora = true, mla_scale_kv_lora = true;

  std::int64_t ffn_hidden_size = 0;
  std::int64_t expert_ffn_hidden_size = 0;
  std::int64_t n_routed_experts = 0, zero_expert_num = 0, moe_topk = 0;
  double routed_scaling_factor = 1.0;

  double rms_norm_eps = 1e-5;
  double rope_theta = 10000.0;
  rope_scaling_config rope_scaling;
  std::int64_t max_position_embeddings = 0;  // 0: unknown (no context limit from the config)

  std::int32_t bos_token_id = 1, eos_token_id = 2;
  bool tie_word_embeddings = false;
  std::int64_t num_nextn_predict_layers = 0;  // 1: the checkpoint has an MTP head (model.mtp.*, section 6)

  // Derived sizes.
  std::int64_t num_attention_layers() const { return 2 * num_layers; }
  std::int64_t num_ngram_tables() const {  // E = K * (N - 1)
    return embedding == embedding_kind::ngram ? emb_split_num * (emb_neighbor_num - 1) : 0;
  }
  std::int64_t ngram_dim() const { return num_ngram_tables() ? hidden_size / num_ngram_tables() : 0; }
  /// Rows of n-gram table i: the explicit size, else r*V + 2i + 1.
  std::int64_t ngram_table_rows(std::int64_t i) const;
  /// Order n of table i (2..N).
  std::int64_t ngram_table_order(std::int64_t i) const { return 2 + i / emb_split_num; }
  std::int64_t qk_head_dim() const { return qk_nope_head_dim + qk_rope_head_dim; }
  std::int64_t num_router_experts() const { return n_routed_experts + zero_expert_num; }
};

/// Parses and validates a config; `source` names the file in error messages.
model_config parse_model_config(std::string_view json, const std::string& source);
/// Reads `path` (a config.json, or a model directory holding one).
model_config load_model_config(const std::filesystem::path& path);
/// The config as released-layout JSON (what init-model and training write).
std::string model_config_to_json(const model_config& config);

}  // namespace troupe
