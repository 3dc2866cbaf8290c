#include "model/weights.hpp"

#include <cstring>
#include <map>

#include "gpu/backend.hpp"
#include "model/config.hpp"
#include "model/safetensors.hpp"
#include "protocol/errors.hpp"

namespace troupe {

std::vector<weight_spec> weight_specs(const model_config& c) {
  std::vector<weight_spec> out;
  auto add = [&](std::string name, shape_t shape, weight_init init, bool keep_f32 = false) {
    out.push_back({std::move(name), std::move(shape), init, keep_f32});
  };
  const auto h = c.hidden_size, heads = c.num_attention_heads;
  auto add_mla = [&](const std::string& a) {
    if (c.q_lora_rank) {
      add(a + "q_a_proj.weight", {c.q_lora_rank, h}, weight_init::matrix);
      add(a + "q_a_layernorm.weight", {c.q_lora_rank}, weight_init::norm);
      add(a + "q_b_proj.weight", {heads * c.qk_head_dim(), c.q_lora_rank}, weight_init::matrix);
    } else {
      add(a + "q_proj.weight", {heads * c.qk_head_dim(), h}, weight_init::matrix);
    }
    add(a + "kv_a_proj_with_mqa.weight", {c.kv_lora_rank + c.qk_rope_head_dim, h}, weight_init::matrix);
    add(a + "kv_a_layernorm.weight", {c.kv_lora_rank}, weight_init::norm);
    add(a + "kv_b_proj.weight", {heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank}, weight_init::matrix);
    add(a + "o_proj.weight", {h, heads * c.v_head_dim}, weight_init::matrix);
  };
  auto add_swiglu = [&](const std::string& m, std::int64_t f) {
    add(m + "gate_proj.weight", {f, h}, weight_init::matrix);
    add(m + "up_proj.weight", {f, h}, weight_init::matrix);
    add(m + "down_proj.weight", {h, f}, weight_init::matrix);
  };
  add("model.embed_tokens.weight", {c.vocab_size, h}, weight_init::embedding);
  for (std::int64_t i = 0; i < c.num_ngram_tables(); ++i)
    add("model.ngram_embeddings.embedders." + std::to_string(i) + ".weight", {c.ngram_table_rows(i), c.ngram_dim()},
        weight_init::embedding);
  for (std::int64_t i = 0; i < c.num_ngram_tables(); ++i)
    add("model.ngram_embeddings.post_projs." + std::to_string(i) + ".weight", {h, c.ngram_dim()}, weight_init::matrix);
  for (std::int64_t l = 0; l < c.num_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    for (int j = 0; j < 2; ++j) {
      const std::string s = std::to_string(j);
      add(p + "input_layernorm." + s + ".weight", {h}, weight_init::norm);
      add(p + "post_attention_layernorm." + s + ".weight", {h}, weight_init::norm);
      add_mla(p + "self_attn." + s + ".");
      add_swiglu(p + "mlps." + s + ".", c.ffn_hidden_size);
    }
    add(p + "mlp.router.classifier.weight", {c.num_router_experts(), h}, weight_init::matrix, true);
    add(p + "mlp.router.e_score_correction_bias", {c.num_router_experts()}, weight_init::bias, true);
    for (std::int64_t e = 0; e < c.n_routed_experts; ++e)
      add_swiglu(p + "mlp.experts." + std::to_string(e) + ".", c.expert_ffn_hidden_size);
  }
  add("model.norm.weight", {h}, weight_init::norm);
  if (!c.tie_word_embeddings) add("lm_head.weight", {c.vocab_size, h}, weight_init::matrix);
  if (c.num_nextn_predict_layers) {  // Troupe's names for the spec's MTP head (section 6)
    add("model.mtp.enorm.weight", {h}, weight_init::norm);
    add("model.mtp.hnorm.weight", {h}, weight_init::norm);
    add("model.mtp.eh_proj.weight", {h, 2 * h}, weight_init::matrix);
    add("model.mtp.layers.0.input_layernorm.weight", {h}, weight_init::norm);
    add("model.mtp.layers.0.post_attention_layernorm.weight", {h}, weight_init::norm);
    add_mla("model.mtp.layers.0.self_attn.");
    add_swiglu("model.mtp.layers.0.mlp.", c.ffn_hidden_size);
    add("model.mtp.norm.weight", {h}, weight_init::norm);
  }
  return out;
}

namespace {

struct loader {
  const checkpoint& ckpt;
  backend& be;
  std::map<std::string, shape_t> shapes;

  tensor host(const std::string& name) const { return ckpt.get(name, shapes.at(name)); }
  /// A matrix read by linear(): kept in the backend's weight type.
  tensor matrix(const std::string& name) const {
    tensor t = host(name);
    return be.upload(t, be.weight_type(t.type()));
  }
  /// Norm weights and the router: always float32.
  tensor f32(const std::string& name) const { return be.upload(host(name), dtype::f32); }
  swiglu_weights swiglu(const std::string& prefix) const {
    tensor gate = host(prefix + "gate_proj.weight");
    tensor up = host(prefix + "up_proj.weight");
    if (up.type() != gate.type()) up = up.to_f32(), gate = gate.to_f32();
    tensor gate_up = tensor::empty({gate.dim(0) + up.dim(0), gate.dim(1)}, gate.type());
    std::memcpy(gate_up.raw(), gate.raw(), gate.nbytes());
    std::memcpy(static_cast<std::byte*>(gate_up.raw()) + gate.nbytes(), up.raw(), up.nbytes());
    return {be.upload(gate_up, be.weight_type(gate_up.type())), matrix(prefix + "down_proj.weight")};
  }
  mla_weights mla(const std::string& a, bool q_lora) const {
    mla_weights att;
    if (q_lora) {
      att.q_a = matrix(a + "q_a_proj.weight");
      att.q_a_norm = f32(a + "q_a_layernorm.weight");
      att.q_b = matrix(a + "q_b_proj.weight");
    } else {
      att.q_b = matrix(a + "q_proj.weight");
    }
    att.kv_a = matrix(a + "kv_a_proj_with_mqa.weight");
    att.kv_a_norm = f32(a + "kv_a_layernorm.weight");
    const tensor kv_b = host(a + "kv_b_proj.weight");
    att.kv_b = be.upload(kv_b, be.kv_b_type(kv_b.type()));
    att.o = matrix(a + "o_proj.weight");
    return att;
  }
  /// Columns [first, first + width) of a matrix, as a matrix of its own.
  tensor columns(const std::string& name, std::int64_t first, std::int64_t width) const {
    const tensor full = host(name);
    tensor part = tensor::empty({full.dim(0), width}, full.type());
    const auto bytes = static_cast<std::size_t>(dtype_size(full.type()));
    for (std::int64_t r = 0; r < full.dim(0); ++r)
      std::memcpy(static_cast<std::byte*>(part.raw()) + static_cast<std::size_t>(r * width) * bytes,
                  static_cast<const std::byte*>(full.raw()) + static_cast<std::size_t>(r * full.dim(1) + first) * bytes,
                  static_cast<std::size_t>(width) * bytes);
    return be.upload(part, be.weight_type(part.type()));
  }
};

}  // namespace

table_placement parse_table_placement(const std::string& name) {
  if (name == "host") return table_placement::host;
  if (name == "device") return table_placement::device;
  throw input_error("table placement '" + name + "': expected host or device");
}

model_weights load_model_weights(const checkpoint& ckpt, const model_config& c, backend& be, table_placement tables) {
  loader ld{ckpt, be, {}};
  for (const auto& s : weight_specs(c)) ld.shapes.emplace(s.name, s.shape);
  model_weights w;
  // Tables are read row by row: in place from the mapping, or from a copy in the backend's memory.
  auto table = [&](const std::string& name) {
    tensor t = ld.host(name);
    return tables == table_placement::device ? be.upload(t, t.type()) : t;
  };
  w.embed = table("model.embed_tokens.weight");
  for (std::int64_t i = 0; i < c.num_ngram_tables(); ++i) {
    w.ngram_tables.push_back(table("model.ngram_embeddings.embedders." + std::to_string(i) + ".weight"));
    w.ngram_projections.push_back(ld.matrix("model.ngram_embeddings.post_projs." + std::to_string(i) + ".weight"));
  }
  for (std::int64_t l = 0; l < c.num_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    block_weights b;
    for (int j = 0; j < 2; ++j) {
      const std::string s = std::to_string(j);
      b.input_norm[j] = ld.f32(p + "input_layernorm." + s + ".weight");
      b.post_attention_norm[j] = ld.f32(p + "post_attention_layernorm." + s + ".weight");
      b.attention[j] = ld.mla(p + "self_attn." + s + ".", c.q_lora_rank > 0);
      b.mlp[j] = ld.swiglu(p + "mlps." + s + ".");
    }
    b.router = ld.f32(p + "mlp.router.classifier.weight");
    b.router_bias = ld.f32(p + "mlp.router.e_score_correction_bias");
    for (std::int64_t e = 0; e < c.n_routed_experts; ++e)
      b.experts.push_back(ld.swiglu(p + "mlp.experts." + std::to_string(e) + "."));
    w.blocks.push_back(std::move(b));
  }
  w.final_norm = ld.f32("model.norm.weight");
  w.lm_head = c.tie_word_embeddings ? ld.matrix("model.embed_tokens.weight") : ld.matrix("lm_head.weight");
  if (c.num_nextn_predict_layers) {
    mtp_weights m;
    m.enorm = ld.f32("model.mtp.enorm.weight");
    m.hnorm = ld.f32("model.mtp.hnorm.weight");
    m.eh_embed = ld.columns("model.mtp.eh_proj.weight", 0, c.hidden_size);
    m.eh_hidden = ld.columns("model.mtp.eh_proj.weight", c.hidden_size, c.hidden_size);
    m.input_norm = ld.f32("model.mtp.layers.0.input_layernorm.weight");
    m.post_attention_norm = ld.f32("model.mtp.layers.0.post_attention_layernorm.weight");
    m.attention = ld.mla("model.mtp.layers.0.self_attn.", c.q_lora_rank > 0);
    m.mlp = ld.swiglu("model.mtp.layers.0.mlp.");
    m.norm = ld.f32("model.mtp.norm.weight");
    w.mtp.push_back(std::move(m));
  }
  return w;
}

}  // namespace troupe
