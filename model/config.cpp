#include "model/config.hpp"

#include <simdjson.h>

#include <cmath>
#include <fstream>
#include <set>
#include <sstream>

#include "model/json_fields.hpp"
#include "protocol/json_writer.hpp"
#include "protocol/errors.hpp"

namespace troupe {
namespace {

using simdjson::dom::element;
using simdjson::dom::object;
using reader = json_fields;

rope_scaling_config parse_rope_scaling(const reader& parent, std::string_view field, element e) {
  object o;
  if (e.get_object().get(o)) parent.fail(field, "must be an object or null");
  const std::string where = parent.source + " (" + std::string(field) + ")";
  reader r{o, where};
  rope_scaling_config s;
  s.type = r.string_or("rope_type", r.string_or("type", "default"));
  if (s.type == "default") return s;
  if (s.type != "yarn") r.fail("rope_type", "'" + s.type + "' is not supported (default or yarn)");
  s.factor = r.number("factor");
  s.original_max_position_embeddings = r.number("original_max_position_embeddings");
  s.beta_fast = r.number_or("beta_fast", 32);
  s.beta_slow = r.number_or("beta_slow", 1);
  s.mscale = r.number_or("mscale", 0);
  s.mscale_all_dim = r.number_or("mscale_all_dim", 0);
  if (r.has("attention_factor")) s.attention_factor = r.number("attention_factor");
  s.truncate = r.boolean_or("truncate", true);
  if (s.factor <= 0) r.fail("factor", "must be positive");
  return s;
}

void validate(const reader& r, model_config& c) {
  if (c.embedding == embedding_kind::ngram) {
    if (c.emb_neighbor_num < 2) r.fail("emb_neighbor_num", "must be at least 2, got " + std::to_string(c.emb_neighbor_num));
    const auto e = c.num_ngram_tables();
    if (c.hidden_size % e != 0)
      r.fail("hidden_size", "(" + std::to_string(c.hidden_size) + ") must be divisible by the number of n-gram tables " +
                                std::to_string(e) + " = emb_split_num * (emb_neighbor_num - 1)");
    if (!c.ngram_table_sizes.empty()) {
      if (static_cast<std::int64_t>(c.ngram_table_sizes.size()) != e)
        r.fail("ngram_table_sizes", "has " + std::to_string(c.ngram_table_sizes.size()) + " entries, expected " + std::to_string(e));
      for (auto m : c.ngram_table_sizes)
        if (m <= 0) r.fail("ngram_table_sizes", "entries must be positive");
    } else if (c.ngram_vocab_size_ratio <= 0) {
      r.fail("ngram_vocab_size_ratio", "must be positive");
    }
  }
  if (c.qk_rope_head_dim % 2) r.fail("qk_rope_head_dim", "must be even (RoPE rotates pairs)");
  if (c.moe_topk > c.num_router_experts())
    r.fail("moe_topk", "(" + std::to_string(c.moe_topk) + ") exceeds n_routed_experts + zero_expert_num (" +
                           std::to_string(c.num_router_experts()) + ")");
  if (c.zero_expert_num < 0) r.fail("zero_expert_num", "must not be negative");
  if (r.has("num_hidden_layers") && r.integer("num_hidden_layers") != 2 * c.num_layers)
    r.fail("num_hidden_layers", "must be 2 * num_layers = " + std::to_string(2 * c.num_layers));
  if (r.has("head_dim") && r.integer("head_dim") != c.qk_rope_head_dim)
    r.fail("head_dim", "must equal qk_rope_head_dim (" + std::to_string(c.qk_rope_head_dim) + ")");
  if (r.has("num_key_value_heads") && r.integer("num_key_value_heads") != c.num_attention_heads)
    r.fail("num_key_value_heads", "must equal num_attention_heads for MLA");
  if (r.string_or("hidden_act", "silu") != "silu") r.fail("hidden_act", "must be \"silu\"");
  if (r.boolean_or("attention_bias", false)) r.fail("attention_bias", "true is not supported (the model has none)");
  if (r.boolean_or("router_bias", false)) r.fail("router_bias", "true is not supported (the model has none)");
  if (c.bos_token_id < 0 || c.bos_token_id >= c.vocab_size) r.fail("bos_token_id", "is outside the vocabulary");
  if (c.eos_token_id < 0 || c.eos_token_id >= c.vocab_size) r.fail("eos_token_id", "is outside the vocabulary");
}

std::int32_t token_id(const reader& r, std::string_view field, std::int32_t fallback) {
  if (!r.has(field)) return fallback;
  element e = r.get(field);
  simdjson::dom::array a;
  if (!e.get_array().get(a)) {  // a list of ids: the first one is the model's EOS
    std::int64_t v;
    if (a.size() == 0 || a.at(0).get_int64().get(v)) r.fail(field, "must be an integer or a non-empty list of integers");
    return static_cast<std::int32_t>(v);
  }
  return static_cast<std::int32_t>(r.integer(field));
}

}  // namespace

std::int64_t model_config::ngram_table_rows(std::int64_t i) const {
  if (!ngram_table_sizes.empty()) return ngram_table_sizes.at(static_cast<std::size_t>(i));
  const auto m = static_cast<std::int64_t>(std::floor(ngram_vocab_size_ratio * static_cast<double>(vocab_size)));
  return m + 2 * i + 1;
}

model_config parse_model_config(std::string_view json, const std::string& source) {
  simdjson::dom::parser parser;
  element doc;
  simdjson::padded_string padded(json);
  if (auto err = parser.parse(padded).get(doc)) throw input_error(source + ": not valid JSON (" + simdjson::error_message(err) + ")");
  object obj;
  if (doc.get_object().get(obj)) throw input_error(source + ": expected a JSON object at the top level");
  reader r{obj, source};

  model_config c;
  simdjson::dom::array archs;
  if (r.get("architectures").get_array().get(archs) || archs.size() == 0) r.fail("architectures", "must be a non-empty list");
  std::string_view arch;
  if (archs.at(0).get_string().get(arch)) r.fail("architectures", "must hold strings");
  c.architecture = std::string(arch);
  if (arch == "LongcatFlashNgramForCausalLM") c.embedding = embedding_kind::ngram;
  else if (arch == "LongcatFlashForCausalLM") c.embedding = embedding_kind::plain;
  else r.fail("architectures", "'" + c.architecture + "' is not LongcatFlashNgramForCausalLM or LongcatFlashForCausalLM");

  c.vocab_size = r.positive("vocab_size");
  c.hidden_size = r.positive("hidden_size");
  c.num_layers = r.positive("num_layers");
  c.num_attention_heads = r.positive("num_attention_heads");
  if (c.embedding == embedding_kind::ngram) {
    c.emb_neighbor_num = r.integer("emb_neighbor_num");
    c.emb_split_num = r.positive("emb_split_num");
    if (r.has("ngram_table_sizes")) {
      simdjson::dom::array sizes;
      if (r.get("ngram_table_sizes").get_array().get(sizes)) r.fail("ngram_table_sizes", "must be a list of integers");
      for (element s : sizes) {
        std::int64_t v;
        if (s.get_int64().get(v)) r.fail("ngram_table_sizes", "must be a list of integers");
        c.ngram_table_sizes.push_back(v);
      }
      c.ngram_vocab_size_ratio = r.number_or("ngram_vocab_size_ratio", 0);
    } else {
      c.ngram_vocab_size_ratio = r.number("ngram_vocab_size_ratio");
    }
  }
  element q_lora;
  if (obj.at_key("q_lora_rank").get(q_lora)) r.fail("q_lora_rank", "is missing (required; null means no query LoRA)");
  c.q_lora_rank = q_lora.is_null() ? 0 : r.positive("q_lora_rank");
  c.kv_lora_rank = r.positive("kv_lora_rank");
  c.qk_nope_head_dim = r.positive("qk_nope_head_dim");
  c.qk_rope_head_dim = r.positive("qk_rope_head_dim");
  c.v_head_dim = r.positive("v_head_dim");
  c.mla_scale_q_lora = r.boolean_or("mla_scale_q_lora", true);
  c.mla_scale_kv_lora = r.boolean_or("mla_scale_kv_lora", true);
  c.ffn_hidden_size = r.positive("ffn_hidden_size");
  c.expert_ffn_hidden_size = r.positive("expert_ffn_hidden_size");
  c.n_routed_experts = r.positive("n_routed_experts");
  c.zero_expert_num = r.integer_or("zero_expert_num", 0);
  c.moe_topk = r.positive("moe_topk");
  c.routed_scaling_factor = r.number("routed_scaling_factor");
  c.rms_norm_eps = r.number("rms_norm_eps");
  if (c.rms_norm_eps <= 0) r.fail("rms_norm_eps", "must be positive");

  // Released configs: rope_theta + rope_scaling; transformers 5: rope_parameters.
  if (r.has("rope_parameters")) {
    element rp = r.get("rope_parameters");
    object o;
    if (rp.get_object().get(o)) r.fail("rope_parameters", "must be an object");
    const std::string where = source + " (rope_parameters)";
    c.rope_theta = reader{o, where}.number("rope_theta");
    c.rope_scaling = parse_rope_scaling(r, "rope_parameters", rp);
  } else {
    c.rope_theta = r.number("rope_theta");
    if (r.has("rope_scaling")) c.rope_scaling = parse_rope_scaling(r, "rope_scaling", r.get("rope_scaling"));
  }
  if (c.rope_theta <= 0) r.fail("rope_theta", "must be positive");
  c.max_position_embeddings = r.integer_or("max_position_embeddings", 0);
  c.bos_token_id = token_id(r, "bos_token_id", 1);
  c.eos_token_id = token_id(r, "eos_token_id", 2);
  c.tie_word_embeddings = r.boolean_or("tie_word_embeddings", false);
  c.num_nextn_predict_layers = r.integer_or("num_nextn_predict_layers", 0);
  if (c.num_nextn_predict_layers < 0 || c.num_nextn_predict_layers > 1)
    r.fail("num_nextn_predict_layers", "must be 0 or 1 (one MTP layer at most)");
  const std::string amp = r.string_or("embedding_amplification", "none");
  if (amp == "none") c.embedding_amplification = amplification::none;
  else if (amp == "sqrt_hidden") c.embedding_amplification = amplification::sqrt_hidden;
  else if (amp == "layer_norm") c.embedding_amplification = amplification::layer_norm;
  else r.fail("embedding_amplification", "'" + amp + "' is not none, sqrt_hidden or layer_norm");
  validate(r, c);
  return c;
}

model_config load_model_config(const std::filesystem::path& path) {
  const auto file = std::filesystem::is_directory(path) ? path / "config.json" : path;
  std::ifstream in(file, std::ios::binary);
  if (!in) throw input_error(file.string() + ": cannot open the model config");
  std::ostringstream text;
  text << in.rdbuf();
  return parse_model_config(text.str(), file.string());
}

std::string model_config_to_json(const model_config& c) {
  json_writer w;
  w.begin_object();
  w.key("architectures").begin_array().value(c.architecture).end_array();
  w.key("model_type").value(c.embedding == embedding_kind::ngram ? "longcat_flash_ngram" : "longcat_flash");
  w.key("vocab_size").value(c.vocab_size);
  w.key("hidden_size").value(c.hidden_size);
  w.key("num_layers").value(c.num_layers);
  w.key("num_hidden_layers").value(c.num_attention_layers());
  w.key("num_attention_heads").value(c.num_attention_heads);
  w.key("num_key_value_heads").value(c.num_attention_heads);
  if (c.embedding == embedding_kind::ngram) {
    w.key("emb_neighbor_num").value(c.emb_neighbor_num);
    w.key("emb_split_num").value(c.emb_split_num);
    w.key("ngram_vocab_size_ratio").value(c.ngram_vocab_size_ratio);
    if (!c.ngram_table_sizes.empty()) {
      w.key("ngram_table_sizes").begin_array();
      for (auto m : c.ngram_table_sizes) w.value(m);
      w.end_array();
    }
  }
  w.key("q_lora_rank");
  if (c.q_lora_rank) w.value(c.q_lora_rank); else w.null();
  w.key("kv_lora_rank").value(c.kv_lora_rank);
  w.key("qk_nope_head_dim").value(c.qk_nope_head_dim);
  w.key("qk_rope_head_dim").value(c.qk_rope_head_dim);
  w.key("head_dim").value(c.qk_rope_head_dim);
  w.key("v_head_dim").value(c.v_head_dim);
  w.key("mla_scale_q_lora").value(c.mla_scale_q_lora);
  w.key("mla_scale_kv_lora").value(c.mla_scale_kv_lora);
  w.key("ffn_hidden_size").value(c.ffn_hidden_size);
  w.key("expert_ffn_hidden_size").value(c.expert_ffn_hidden_size);
  w.key("n_routed_experts").value(c.n_routed_experts);
  w.key("zero_expert_num").value(c.zero_expert_num);
  w.key("moe_topk").value(c.moe_topk);
  w.key("routed_scaling_factor").value(c.routed_scaling_factor);
  w.key("rms_norm_eps").value(c.rms_norm_eps);
  w.key("rope_theta").value(c.rope_theta);
  w.key("rope_scaling");
  if (c.rope_scaling.type == "default") {
    w.null();
  } else {
    const auto& s = c.rope_scaling;
    w.begin_object();
    w.key("rope_type").value(s.type);
    w.key("factor").value(s.factor);
    w.key("original_max_position_embeddings").value(s.original_max_position_embeddings);
    w.key("beta_fast").value(s.beta_fast);
    w.key("beta_slow").value(s.beta_slow);
    if (s.mscale) w.key("mscale").value(s.mscale);
    if (s.mscale_all_dim) w.key("mscale_all_dim").value(s.mscale_all_dim);
    if (s.attention_factor) w.key("attention_factor").value(*s.attention_factor);
    w.end_object();
  }
  if (c.max_position_embeddings) w.key("max_position_embeddings").value(c.max_position_embeddings);
  w.key("bos_token_id").value(static_cast<std::int64_t>(c.bos_token_id));
  w.key("eos_token_id").value(static_cast<std::int64_t>(c.eos_token_id));
  w.key("tie_word_embeddings").value(c.tie_word_embeddings);
  if (c.num_nextn_predict_layers) w.key("num_nextn_predict_layers").value(c.num_nextn_predict_layers);
  if (c.embedding_amplification == amplification::sqrt_hidden) w.key("embedding_amplification").value("sqrt_hidden");
  if (c.embedding_amplification == amplification::layer_norm) w.key("embedding_amplification").value("layer_norm");
  w.key("hidden_act").value("silu");
  w.key("torch_dtype").value("bfloat16");
  w.end_object();
  return w.str() + "\n";
}

}  // namespace troupe
