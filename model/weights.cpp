#include "model/weights.hpp"

#include <cstring>
#include <map>

#include "gpu/backend.hpp"
#include "model/config.hpp"
#include "model/safetensors.hpp"

namespace troupe {

std::vector<weight_spec> weight_specs(const model_config& c) {
  std::vector<weight_spec> out;
  auto add = [&](std::string name, shape_t shape, weight_init init, bool keep_f32 = false) {
    out.push_back({std::move(name), std::move(shape), init, keep_f32});
  };
  const auto h = c.hidden_size, heads = c.num_attention_heads;
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
      const std::string a = p + "self_attn." + s + ".";
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
      const std::string m = p + "mlps." + s + ".";
      add(m + "gate_proj.weight", {c.ffn_hidden_size, h}, weight_init::matrix);
      add(m + "up_proj.weight", {c.ffn_hidden_size, h}, weight_init::matrix);
      add(m + "down_proj.weight", {h, c.ffn_hidden_size}, weight_init::matrix);
    }
    add(p + "mlp.router.classifier.weight", {c.num_router_experts(), h}, weight_init::matrix, true);
    add(p + "mlp.router.e_score_correction_bias", {c.num_router_experts()}, weight_init::bias, true);
    for (std::int64_t e = 0; e < c.n_routed_experts; ++e) {
      const std::string x = p + "mlp.experts." + std::to_string(e) + ".";
      add(x + "gate_proj.weight", {c.expert_ffn_hidden_size, h}, weight_init::matrix);
      add(x + "up_proj.weight", {c.expert_ffn_hidden_size, h}, weight_init::matrix);
      add(x + "down_proj.weight", {h, c.expert_ffn_hidden_size}, weight_init::matrix);
    }
  }
  add("model.norm.weight", {h}, weight_init::norm);
  if (!c.tie_word_embeddings) add("lm_head.weight", {c.vocab_size, h}, weight_init::matrix);
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
  /// Norm weights, the router, kv_b: always float32.
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
};

}  // namespace

model_weights load_model_weights(const checkpoint& ckpt, const model_config& c, backend& be) {
  loader ld{ckpt, be, {}};
  for (const auto& s : weight_specs(c)) ld.shapes.emplace(s.name, s.shape);
  model_weights w;
  // Tables are read row by row; a host backend reads them straight from the mapping.
  w.embed = ld.host("model.embed_tokens.weight");
  for (std::int64_t i = 0; i < c.num_ngram_tables(); ++i) {
    w.ngram_tables.push_back(ld.host("model.ngram_embeddings.embedders." + std::to_string(i) + ".weight"));
    w.ngram_projections.push_back(ld.matrix("model.ngram_embeddings.post_projs." + std::to_string(i) + ".weight"));
  }
  for (std::int64_t l = 0; l < c.num_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    block_weights b;
    for (int j = 0; j < 2; ++j) {
      const std::string s = std::to_string(j);
      b.input_norm[j] = ld.f32(p + "input_layernorm." + s + ".weight");
      b.post_attention_norm[j] = ld.f32(p + "post_attention_layernorm." + s + ".weight");
      const std::string a = p + "self_attn." + s + ".";
      auto& att = b.attention[j];
      if (c.q_lora_rank) {
        att.q_a = ld.matrix(a + "q_a_proj.weight");
        att.q_a_norm = ld.f32(a + "q_a_layernorm.weight");
        att.q_b = ld.matrix(a + "q_b_proj.weight");
      } else {
        att.q_b = ld.matrix(a + "q_proj.weight");
      }
      att.kv_a = ld.matrix(a + "kv_a_proj_with_mqa.weight");
      att.kv_a_norm = ld.f32(a + "kv_a_layernorm.weight");
      att.kv_b = ld.f32(a + "kv_b_proj.weight");
      att.o = ld.matrix(a + "o_proj.weight");
      b.mlp[j] = ld.swiglu(p + "mlps." + s + ".");
    }
    b.router = ld.f32(p + "mlp.router.classifier.weight");
    b.router_bias = ld.f32(p + "mlp.router.e_score_correction_bias");
    for (std::int64_t e = 0; e < c.n_routed_experts; ++e)
      b.experts.push_back(ld.swiglu(p + "mlp.experts." + std::to_string(e) + "."));
    w.blocks.push_back(std::move(b));
  }
  w.final_norm = ld.f32("model.norm.weight");
  w.lm_head = c.tie_word_embeddings ? be.upload(w.embed, be.weight_type(w.embed.type())) : ld.matrix("lm_head.weight");
  return w;
}

}  // namespace troupe
