#include "model/model.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "model/rope.hpp"
#include "model/safetensors.hpp"
#include "protocol/errors.hpp"

namespace troupe {

struct model::step {
  std::span<const step_input> batch;
  std::int64_t num_rows = 0;
  tensor tokens;     // i32 [T]
  tensor positions;  // i64 [T]
  std::vector<std::int64_t> row_begin;  // per sequence
};

model::model(model_config config, model_weights weights, backend& be)
    : config_(std::move(config)),
      weights_(std::move(weights)),
      be_(be),
      hasher_(config_),
      rope_(make_rope_params(config_)),
      softmax_scale_(mla_softmax_scale(config_)) {}

std::unique_ptr<model> model::load(const std::filesystem::path& dir, backend& be) {
  model_config config = load_model_config(dir);
  checkpoint ckpt = checkpoint::open(dir);
  model_weights weights = load_model_weights(ckpt, config, be);
  return std::make_unique<model>(std::move(config), std::move(weights), be);
}

std::vector<std::int64_t> model::ngram_ids(std::span<const std::int32_t> tokens, ngram_context context) const {
  std::vector<std::int64_t> ids(tokens.size() * static_cast<std::size_t>(hasher_.num_tables()));
  hasher_.hash(tokens, context, ids.data());
  return ids;
}

tensor model::norm(const tensor& x, const tensor& w) {
  tensor y = be_.empty(x.shape(), dtype::f32);
  be_.rms_norm(x, w, static_cast<float>(config_.rms_norm_eps), y);
  return y;
}

tensor model::embed(step& s) {
  const auto t = s.num_rows;
  tensor out = be_.empty({t, config_.hidden_size}, dtype::f32);
  if (config_.embedding == embedding_kind::plain) {
    tensor ids = tensor::empty({t}, dtype::i64);
    for (std::int64_t r = 0; r < t; ++r) ids.data<std::int64_t>()[r] = s.tokens.data<std::int32_t>()[r];
    be_.gather_rows(weights_.embed, ids, out);
    return out;
  }
  tensor ngram = tensor::empty({t, hasher_.num_tables()}, dtype::i64);
  for (std::size_t i = 0; i < s.batch.size(); ++i) {
    const auto& in = s.batch[i];
    hasher_.hash(in.tokens, in.state->ngram, ngram.data<std::int64_t>() + s.row_begin[i] * hasher_.num_tables());
  }
  be_.ngram_embed(weights_.embed, s.tokens, ngram, weights_.ngram_tables, weights_.ngram_projections, out);
  return out;
}

tensor model::attention(const mla_weights& w, std::int64_t layer, const tensor& x, step& s) {
  const auto& c = config_;
  const auto t = s.num_rows, heads = c.num_attention_heads;
  const std::int64_t latent_width = c.kv_lora_rank + c.qk_rope_head_dim;
  const float eps = static_cast<float>(c.rms_norm_eps);

  tensor q = be_.empty({t, heads * c.qk_head_dim()}, dtype::f32);  // [T, heads * (nope + rope)]
  if (c.q_lora_rank) {
    tensor q_lat = be_.empty({t, c.q_lora_rank}, dtype::f32);
    be_.linear(x, w.q_a, q_lat, write_mode::overwrite);
    be_.rms_norm(q_lat, w.q_a_norm, eps, q_lat);
    be_.linear(q_lat, w.q_b, q, write_mode::overwrite);
    if (c.mla_scale_q_lora)
      be_.scale(q, static_cast<float>(std::sqrt(static_cast<double>(c.hidden_size) / static_cast<double>(c.q_lora_rank))));
  } else {
    be_.linear(x, w.q_b, q, write_mode::overwrite);
  }
  be_.rope_interleaved(q, heads, c.qk_head_dim(), c.qk_nope_head_dim, s.positions, rope_);

  tensor kv = be_.empty({t, latent_width}, dtype::f32);  // [T, kv_lora | rope]: the cache row layout
  be_.linear(x, w.kv_a, kv, write_mode::overwrite);
  const float kv_scale =
      c.mla_scale_kv_lora ? static_cast<float>(std::sqrt(static_cast<double>(c.hidden_size) / static_cast<double>(c.kv_lora_rank))) : 1.0f;
  be_.rms_norm_prefix_inplace(kv, c.kv_lora_rank, w.kv_a_norm, eps, kv_scale);
  be_.rope_interleaved(kv, 1, latent_width, c.kv_lora_rank, s.positions, rope_);

  std::vector<attention_segment> segments;
  for (std::size_t i = 0; i < s.batch.size(); ++i) {
    auto& st = *s.batch[i].state;
    const auto rows = static_cast<std::int64_t>(s.batch[i].tokens.size());
    tensor& cache = st.latents[static_cast<std::size_t>(layer)];
    const std::int64_t need = st.num_tokens + rows;
    if (!cache.defined() || cache.dim(0) < need) {  // grow geometrically; old rows move once
      const std::int64_t capacity = std::max<std::int64_t>({need, 64, cache.defined() ? 2 * cache.dim(0) : 0});
      tensor grown = be_.empty({capacity, latent_width}, dtype::f32);
      if (cache.defined() && st.num_tokens) be_.copy_rows(cache.rows(0, st.num_tokens), grown, 0);
      cache = grown;
    }
    be_.copy_rows(kv.rows(s.row_begin[i], s.row_begin[i] + rows), cache, st.num_tokens);
    segments.push_back({s.row_begin[i], rows, st.num_tokens, cache});
  }
  tensor attn = be_.empty({t, heads * c.v_head_dim}, dtype::f32);
  be_.mla_attention(q, w.kv_b, segments,
                    {heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank}, softmax_scale_,
                    attn);
  tensor out = be_.empty({t, c.hidden_size}, dtype::f32);
  be_.linear(attn, w.o, out, write_mode::overwrite);
  return out;
}

tensor model::swiglu(const swiglu_weights& w, const tensor& x) {
  const auto t = x.dim(0), f = w.down.dim(1);
  tensor gate_up = be_.empty({t, 2 * f}, dtype::f32);
  be_.linear(x, w.gate_up, gate_up, write_mode::overwrite);
  tensor act = be_.empty({t, f}, dtype::f32);
  be_.swiglu(gate_up, act);
  tensor out = be_.empty({t, w.down.dim(0)}, dtype::f32);
  be_.linear(act, w.down, out, write_mode::overwrite);
  return out;
}

tensor model::moe(const block_weights& w, const tensor& u) {
  const auto& c = config_;
  const auto t = u.dim(0), k = c.moe_topk;
  tensor logits = be_.empty({t, c.num_router_experts()}, dtype::f32);
  be_.linear(u, w.router, logits, write_mode::overwrite);
  tensor idx = be_.empty({t, k}, dtype::i32);
  tensor gate = be_.empty({t, k}, dtype::f32);
  be_.router_topk(logits, w.router_bias, static_cast<int>(k), static_cast<float>(c.routed_scaling_factor), idx, gate);
  const tensor host_idx = be_.download(idx);
  const tensor host_gate = be_.download(gate);

  // Dispatch: the token rows and gate weights of each expert, in expert order.
  std::vector<std::vector<std::int32_t>> rows(static_cast<std::size_t>(c.num_router_experts()));
  std::vector<std::vector<float>> weights(rows.size());
  for (std::int64_t r = 0; r < t; ++r)
    for (std::int64_t j = 0; j < k; ++j) {
      const auto e = static_cast<std::size_t>(host_idx.data<std::int32_t>()[r * k + j]);
      rows[e].push_back(static_cast<std::int32_t>(r));
      weights[e].push_back(host_gate.data<float>()[r * k + j]);
    }
  tensor out = be_.empty({t, c.hidden_size}, dtype::f32);
  std::memset(out.raw(), 0, out.nbytes());
  for (std::size_t e = 0; e < rows.size(); ++e) {
    const auto n = static_cast<std::int64_t>(rows[e].size());
    if (n == 0) continue;
    tensor row_ids = tensor::empty({n}, dtype::i64);
    tensor row_i32 = tensor::empty({n}, dtype::i32);
    tensor gate_w = tensor::empty({n}, dtype::f32);
    for (std::int64_t i = 0; i < n; ++i) {
      row_ids.data<std::int64_t>()[i] = rows[e][i];
      row_i32.data<std::int32_t>()[i] = rows[e][i];
      gate_w.data<float>()[i] = weights[e][i];
    }
    tensor x = be_.empty({n, c.hidden_size}, dtype::f32);
    be_.gather_rows(u, row_ids, x);
    // Zero (identity) experts add their gated input and cost no GEMM.
    const tensor y = static_cast<std::int64_t>(e) < c.n_routed_experts ? swiglu(w.experts[e], x) : x;
    be_.scatter_add_rows(y, row_i32, gate_w, out);
  }
  return out;
}

tensor model::forward(std::span<const step_input> batch, logits_mode mode) {
  const auto& c = config_;
  step s;
  s.batch = batch;
  for (const auto& in : batch) {
    if (in.tokens.empty()) throw input_error("model::forward: a sequence in the batch has no new tokens");
    s.row_begin.push_back(s.num_rows);
    s.num_rows += static_cast<std::int64_t>(in.tokens.size());
    if (c.max_position_embeddings && in.state->num_tokens + static_cast<std::int64_t>(in.tokens.size()) > c.max_position_embeddings)
      throw input_error("sequence of " + std::to_string(in.state->num_tokens + in.tokens.size()) +
                        " tokens exceeds max_position_embeddings = " + std::to_string(c.max_position_embeddings));
  }
  s.tokens = tensor::empty({s.num_rows}, dtype::i32);
  s.positions = tensor::empty({s.num_rows}, dtype::i64);
  for (std::size_t i = 0; i < batch.size(); ++i) {
    auto& st = *batch[i].state;
    if (st.latents.empty()) st.latents.resize(static_cast<std::size_t>(c.num_attention_layers()));
    for (std::size_t j = 0; j < batch[i].tokens.size(); ++j) {
      const std::int32_t tok = batch[i].tokens[j];
      if (tok < 0 || tok >= c.vocab_size)
        throw input_error("token id " + std::to_string(tok) + " is outside the vocabulary of " + std::to_string(c.vocab_size));
      s.tokens.data<std::int32_t>()[s.row_begin[i] + j] = tok;
      s.positions.data<std::int64_t>()[s.row_begin[i] + j] = st.num_tokens + static_cast<std::int64_t>(j);
    }
  }

  tensor h = embed(s);
  for (std::int64_t l = 0; l < c.num_layers; ++l) {
    const auto& b = weights_.blocks[static_cast<std::size_t>(l)];
    tensor a = attention(b.attention[0], 2 * l, norm(h, b.input_norm[0]), s);
    be_.add(a, h);                                   // a = h + MLA_0(RMS(h))
    tensor u = norm(a, b.post_attention_norm[0]);
    tensor shortcut = moe(b, u);                     // added at the end of the block
    tensor m0 = swiglu(b.mlp[0], u);
    be_.add(m0, a);                                  // b = a + MLP_0(u)
    tensor c1 = attention(b.attention[1], 2 * l + 1, norm(m0, b.input_norm[1]), s);
    be_.add(c1, m0);                                 // c = b + MLA_1(RMS(b))
    tensor out = swiglu(b.mlp[1], norm(c1, b.post_attention_norm[1]));
    be_.add(out, c1);
    be_.add(out, shortcut);                          // out = (c + MLP_1(v)) + moe
    h = out;
  }
  for (const auto& in : batch) in.state->num_tokens += static_cast<std::int64_t>(in.tokens.size());

  tensor selected = h;
  if (mode == logits_mode::last_token) {
    selected = be_.empty({static_cast<std::int64_t>(batch.size()), c.hidden_size}, dtype::f32);
    for (std::size_t i = 0; i < batch.size(); ++i) {
      const auto last = s.row_begin[i] + static_cast<std::int64_t>(batch[i].tokens.size()) - 1;
      be_.copy_rows(h.rows(last, last + 1), selected, static_cast<std::int64_t>(i));
    }
  }
  tensor normed = norm(selected, weights_.final_norm);
  tensor logits = be_.empty({normed.dim(0), c.vocab_size}, dtype::f32);
  be_.linear(normed, weights_.lm_head, logits, write_mode::overwrite);
  return be_.download(logits);
}

}  // namespace troupe
