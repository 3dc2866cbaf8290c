#include "model/model.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

#include "model/recorded_step.hpp"
#include "model/rope.hpp"
#include "model/safetensors.hpp"
#include "protocol/errors.hpp"

namespace troupe {

step_layout step_layout::make(std::span<const std::int64_t> num_rows, std::span<const std::int64_t> first_position) {
  if (num_rows.size() != first_position.size()) throw std::logic_error("step_layout: sizes differ");
  step_layout l;
  for (std::size_t i = 0; i < num_rows.size(); ++i) {
    if (num_rows[i] <= 0) throw input_error("a sequence in the step has no new tokens");
    l.row_begin.push_back(l.total_rows);
    l.num_rows.push_back(num_rows[i]);
    l.first_position.push_back(first_position[i]);
    l.total_rows += num_rows[i];
  }
  l.positions = tensor::empty({l.total_rows}, dtype::i64);
  l.row_seq = tensor::empty({l.total_rows}, dtype::i32);
  for (std::size_t i = 0; i < num_rows.size(); ++i)
    for (std::int64_t j = 0; j < num_rows[i]; ++j) {
      l.positions.data<std::int64_t>()[l.row_begin[i] + j] = first_position[i] + j;
      l.row_seq.data<std::int32_t>()[l.row_begin[i] + j] = static_cast<std::int32_t>(i);
    }
  return l;
}

const tensor& step_layout::positions_on(backend& be) const {
  if (be.where() == positions.where()) return positions;
  if (!positions_device_.defined()) positions_device_ = be.upload(positions, dtype::i64);
  return positions_device_;
}

const tensor& step_layout::row_seq_on(backend& be) const {
  if (be.where() == row_seq.where()) return row_seq;
  if (!row_seq_device_.defined()) row_seq_device_ = be.upload(row_seq, dtype::i32);
  return row_seq_device_;
}

std::vector<std::int64_t> step_layout::last_rows() const {
  std::vector<std::int64_t> out;
  for (std::size_t i = 0; i < row_begin.size(); ++i) out.push_back(row_begin[i] + num_rows[i] - 1);
  return out;
}

model::model(model_config config, model_weights weights, backend& be)
    : config_(std::move(config)),
      weights_(std::move(weights)),
      be_(be),
      hasher_(config_),
      rope_(make_rope_params(config_)),
      softmax_scale_(mla_softmax_scale(config_)),
      plain_blocks_(be, default_kv_block_tokens, config_.kv_lora_rank + config_.qk_rope_head_dim) {
  tensor freq = tensor::empty({static_cast<std::int64_t>(rope_.inv_freq.size())}, dtype::f32);
  std::copy(rope_.inv_freq.begin(), rope_.inv_freq.end(), freq.data<float>());
  inv_freq_ = be_.upload(freq, dtype::f32);
}

model::~model() = default;

std::unique_ptr<model> model::load(const std::filesystem::path& dir, backend& be, table_placement tables) {
  model_config config = load_model_config(dir);
  checkpoint ckpt = checkpoint::open(dir);
  model_weights weights = load_model_weights(ckpt, config, be, tables);
  return std::make_unique<model>(std::move(config), std::move(weights), be);
}

std::vector<std::int64_t> model::ngram_ids(std::span<const std::int32_t> tokens, ngram_context context) const {
  std::vector<std::int64_t> ids(tokens.size() * static_cast<std::size_t>(hasher_.num_tables()));
  hasher_.hash(tokens, context, ids.data());
  return ids;
}

void model::advance_ngram(ngram_context& context, std::span<const std::int32_t> tokens) const {
  if (hasher_.num_tables() == 0) return;  // plain embeddings keep no N-gram cache
  std::vector<std::int64_t> ids(tokens.size() * static_cast<std::size_t>(hasher_.num_tables()));
  hasher_.hash(tokens, context, ids.data());
}

ngram_context model::ngram_after(std::span<const std::int32_t> tokens) const {
  ngram_context context;
  const auto window = std::min<std::size_t>(tokens.size(), static_cast<std::size_t>(std::max<std::int64_t>(0, config_.emb_neighbor_num - 1)));
  advance_ngram(context, tokens.last(window));  // a segment boundary inside the window resets it, as it would have
  return context;
}

float model::eps() const { return static_cast<float>(config_.rms_norm_eps); }

tensor model::norm(const tensor& x, const tensor& w) {
  tensor y = be_.empty(x.shape(), dtype::f32);
  be_.rms_norm(x, w, eps(), y);
  return y;
}

tensor model::embed(const tensor& tokens, const step_layout& layout, std::span<ngram_context* const> contexts) {
  tensor out = embed_unamplified(tokens, layout, contexts);
  amplify(out);
  return out;
}

void model::amplify(tensor& embedded) {
  switch (config_.embedding_amplification) {
    case amplification::none: break;
    case amplification::sqrt_hidden:
      be_.scale(embedded, static_cast<float>(std::sqrt(static_cast<double>(config_.hidden_size))));
      break;
    case amplification::layer_norm: be_.layer_norm(embedded, eps(), embedded); break;
  }
}

tensor model::token_ids(const tensor& tokens) const {
  const auto t = tokens.numel();
  const auto* tok = tokens.data<std::int32_t>();
  tensor ids = tensor::empty({t}, dtype::i64);
  for (std::int64_t r = 0; r < t; ++r) {
    if (tok[r] < 0 || tok[r] >= config_.vocab_size)
      throw input_error("token id " + std::to_string(tok[r]) + " is outside the vocabulary of " +
                        std::to_string(config_.vocab_size));
    ids.data<std::int64_t>()[r] = tok[r];
  }
  return ids;
}

tensor model::embed_unamplified(const tensor& tokens, const step_layout& layout, std::span<ngram_context* const> contexts) {
  const auto t = layout.total_rows;
  const tensor ids = token_ids(tokens);
  tensor out = be_.empty({t, config_.hidden_size}, dtype::f32);
  if (config_.embedding == embedding_kind::plain) {
    be_.gather_rows(weights_.embed, ids, out);
    return out;
  }
  const tensor ngram = hash_ngrams(tokens, layout, contexts);
  be_.ngram_embed(weights_.embed, ids, ngram, weights_.ngram_tables, weights_.ngram_projections, out);
  return out;
}

tensor model::hash_ngrams(const tensor& tokens, const step_layout& layout, std::span<ngram_context* const> contexts) {
  const auto t = layout.total_rows, e = hasher_.num_tables();
  std::vector<std::int64_t> by_row(static_cast<std::size_t>(t * e));
  for (std::size_t i = 0; i < layout.num_sequences(); ++i)
    hasher_.hash({tokens.data<std::int32_t>() + layout.row_begin[i], static_cast<std::size_t>(layout.num_rows[i])},
                 *contexts[i], by_row.data() + layout.row_begin[i] * e);
  tensor ngram = tensor::empty({e, t}, dtype::i64);
  for (std::int64_t r = 0; r < t; ++r)
    for (std::int64_t i = 0; i < e; ++i) ngram.data<std::int64_t>()[i * t + r] = by_row[static_cast<std::size_t>(r * e + i)];
  return ngram;
}

std::int64_t model::claim_blocks(latent_cache& cache, std::int64_t first_position, std::int64_t rows,
                                 latent_block_allocator& blocks) {
  const std::int64_t block = blocks.block_tokens(), need = (first_position + rows + block - 1) / block;
  if (static_cast<std::int64_t>(cache.blocks.size()) * block < first_position)
    throw std::logic_error("latent cache holds fewer tokens than the sequence's position");
  while (static_cast<std::int64_t>(cache.blocks.size()) < need) cache.blocks.push_back(blocks.allocate());
  return need;
}

void model::block_addresses(const latent_cache& cache, std::int64_t count, std::int64_t* out) {
  for (std::int64_t b = 0; b < count; ++b) out[b] = reinterpret_cast<std::int64_t>(cache.blocks[static_cast<std::size_t>(b)].raw());
}

paged_latents model::page(const step_layout& layout, std::span<latent_cache* const> caches, latent_block_allocator& blocks) {
  std::vector<std::int64_t> need(layout.num_sequences());
  std::int64_t max_blocks = 1, max_keys = 1;
  for (std::size_t i = 0; i < layout.num_sequences(); ++i) {
    need[i] = claim_blocks(*caches[i], layout.first_position[i], layout.num_rows[i], blocks);
    max_blocks = std::max(max_blocks, need[i]);
    max_keys = std::max(max_keys, layout.first_position[i] + layout.num_rows[i]);
  }
  tensor table = tensor::zeros({static_cast<std::int64_t>(layout.num_sequences()), max_blocks}, dtype::i64);
  for (std::size_t i = 0; i < layout.num_sequences(); ++i)
    block_addresses(*caches[i], need[i], table.data<std::int64_t>() + static_cast<std::int64_t>(i) * max_blocks);
  const std::int64_t rows_per_sequence = *std::max_element(layout.num_rows.begin(), layout.num_rows.end());
  return {be_.where() == table.where() ? table : be_.upload(table, dtype::i64), layout.row_seq_on(be_),
          layout.positions_on(be_), blocks.block_tokens(), max_keys, rows_per_sequence, layout.row_seq, layout.positions};
}

tensor model::embed_on_device(device_ngram* ngram, const tensor& tokens, const tensor& token_rows, tensor& ngram_ids) {
  tensor h = be_.empty({tokens.numel(), config_.hidden_size}, dtype::f32);
  if (ngram)
    be_.ngram_embed_next(*ngram, tokens, weights_.embed, token_rows, ngram_ids, weights_.ngram_tables,
                         weights_.ngram_projections, h);
  else
    be_.ngram_embed(weights_.embed, token_rows, ngram_ids, weights_.ngram_tables, weights_.ngram_projections, h);
  amplify(h);
  return h;
}

tensor model::attention(const mla_weights& w, const tensor& x, const paged_latents& cache) {
  const auto& c = config_;
  const auto t = x.dim(0), heads = c.num_attention_heads;
  const std::int64_t latent_width = c.kv_lora_rank + c.qk_rope_head_dim;
  const float eps = this->eps();

  // MLA's optional query scale multiplies every score, so it joins the softmax scale instead of
  // costing a pass over q.
  float q_scale = 1.0f;
  tensor q = be_.empty({t, heads * c.qk_head_dim()}, dtype::f32);  // [T, heads * (nope + rope)], rope not yet applied
  tensor kv = be_.empty({t, latent_width}, dtype::f32);             // [T, kv_lora | rope]: the cache row layout
  const rope_table rope{inv_freq_, rope_.attention_factor};
  const float kv_scale =
      c.mla_scale_kv_lora ? static_cast<float>(std::sqrt(static_cast<double>(c.hidden_size) / static_cast<double>(c.kv_lora_rank))) : 1.0f;
  auto store_latents = [&] { be_.write_latents(kv, {w.kv_a_norm, eps, kv_scale}, rope, cache); };
  if (c.q_lora_rank) {
    tensor q_lat = be_.empty({t, c.q_lora_rank}, dtype::f32);
    be_.linear_pair(x, w.q_a, q_lat, w.kv_a, kv);
    // The latents' norm, RoPE and cache write need nothing of the query's second projection.
    be_.concurrently(store_latents, [&] {
      be_.rms_norm(q_lat, w.q_a_norm, eps, q_lat);
      be_.linear(q_lat, w.q_b, q, write_mode::overwrite);
    });
    if (c.mla_scale_q_lora)
      q_scale = static_cast<float>(std::sqrt(static_cast<double>(c.hidden_size) / static_cast<double>(c.q_lora_rank)));
  } else {
    be_.linear_pair(x, w.q_b, q, w.kv_a, kv);
    store_latents();
  }

  tensor attn = be_.empty({t, heads * c.v_head_dim}, dtype::f32);
  be_.mla_attention(q, w.kv_b, cache, {heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank}, rope,
                    softmax_scale_ * q_scale, attn);
  tensor out = be_.empty({t, c.hidden_size}, dtype::f32);
  be_.linear(attn, w.o, out, write_mode::overwrite);
  return out;
}

tensor model::swiglu(const swiglu_weights& w, const tensor& x) {
  tensor out = be_.empty({x.dim(0), w.down.dim(0)}, dtype::f32);
  swiglu(w, x, out, write_mode::overwrite);
  return out;
}

void model::swiglu(const swiglu_weights& w, const tensor& x, tensor& y, write_mode mode) {
  tensor act = be_.empty({x.dim(0), w.down.dim(1)}, dtype::f32);
  be_.linear_swiglu(x, w.gate_up, act);
  be_.linear(act, w.down, y, mode);
}

block_front model::block_front_half(std::int64_t block, const tensor& h, const step_layout& layout,
                                    std::span<latent_cache* const> caches, latent_block_allocator& blocks) {
  return front_half(block, h, page(layout, caches, blocks));
}

tensor model::block_back_half(std::int64_t block, const block_front& front, const step_layout& layout,
                              std::span<latent_cache* const> caches, latent_block_allocator& blocks) {
  return back_half(block, front, page(layout, caches, blocks));
}

block_front model::front_half(std::int64_t block, const tensor& h, const paged_latents& cache, const tensor* moe) {
  const auto& b = weights_.blocks.at(static_cast<std::size_t>(block));
  block_front f;
  tensor x;
  if (moe) {
    x = be_.empty(h.shape(), dtype::f32);
    tensor sum = h;  // the same storage: h becomes the block before's output
    be_.add_rms_norm(sum, *moe, b.input_norm[0], eps(), x);
  } else {
    x = norm(h, b.input_norm[0]);
  }
  f.a = attention(b.attention[0], x, cache);
  f.u = be_.empty(h.shape(), dtype::f32);
  be_.add_rms_norm(f.a, h, b.post_attention_norm[0], eps(), f.u);  // a = h + MLA_0(RMS(h)); u = RMS(a)
  return f;
}

tensor model::back_half(std::int64_t block, const block_front& front, const paged_latents& cache) {
  const auto& b = weights_.blocks.at(static_cast<std::size_t>(block));
  tensor m0 = swiglu(b.mlp[0], front.u), normed = be_.empty(m0.shape(), dtype::f32);
  be_.add_rms_norm(m0, front.a, b.input_norm[1], eps(), normed);  // b = a + MLP_0(u)
  tensor c1 = attention(b.attention[1], normed, cache);
  be_.add_rms_norm(c1, m0, b.post_attention_norm[1], eps(), normed);  // c = b + MLA_1(RMS(b)); v = RMS(c)
  swiglu(b.mlp[1], normed, c1, write_mode::accumulate);  // c + MLP_1(v); the caller adds the MoE term
  return c1;
}

tensor model::blocks(tensor h, const std::function<paged_latents(std::int64_t)>& pages) {
  // A block's output is (c + MLP_1(v)) + moe(u), summed as the actor graph's stages sum it; the
  // MoE term is added by the next block's first norm (the last block's by an add).
  tensor moe_out;
  for (std::int64_t l = 0; l < config_.num_layers; ++l) {
    const block_front front = front_half(l, h, pages(2 * l), moe_out.defined() ? &moe_out : nullptr);
    const paged_latents back_pages = pages(2 * l + 1);  // may upload block tables: not inside a branch
    // The shortcut MoE reads only u, so it runs beside the block's second half (spec: ScMoE).
    moe_out = be_.empty(h.shape(), dtype::f32);
    be_.concurrently([&] { moe(l, front.u, moe_out, write_mode::overwrite); },
                     [&] { h = back_half(l, front, back_pages); });
  }
  if (moe_out.defined()) be_.add(h, moe_out);
  return h;
}

moe_routing model::route(std::int64_t block, const tensor& u) {
  const auto& c = config_;
  const auto& w = weights_.blocks.at(static_cast<std::size_t>(block));
  const auto t = u.dim(0), k = c.moe_topk;
  tensor logits = be_.empty({t, c.num_router_experts()}, dtype::f32);
  be_.linear(u, w.router, logits, write_mode::overwrite);
  tensor idx = be_.empty({t, k}, dtype::i32);
  tensor gate = be_.empty({t, k}, dtype::f32);
  be_.router_topk(logits, w.router_bias, static_cast<int>(k), static_cast<float>(c.routed_scaling_factor), idx, gate);
  const tensor host_idx = be_.download(idx);
  const tensor host_gate = be_.download(gate);
  moe_routing r;
  r.rows.resize(static_cast<std::size_t>(c.num_router_experts()));
  r.gates.resize(r.rows.size());
  for (std::int64_t row = 0; row < t; ++row)
    for (std::int64_t j = 0; j < k; ++j) {
      const auto e = static_cast<std::size_t>(host_idx.data<std::int32_t>()[row * k + j]);
      r.rows[e].push_back(static_cast<std::int32_t>(row));
      r.gates[e].push_back(host_gate.data<float>()[row * k + j]);
    }
  return r;
}

tensor model::gather(const tensor& x, std::span<const std::int32_t> rows) {
  const auto n = static_cast<std::int64_t>(rows.size());
  tensor ids = tensor::empty({n}, dtype::i64);
  for (std::int64_t i = 0; i < n; ++i) ids.data<std::int64_t>()[i] = rows[static_cast<std::size_t>(i)];
  tensor out = be_.empty({n, x.dim(1)}, dtype::f32);
  be_.gather_rows(x, ids, out);
  return out;
}

tensor model::expert_forward(std::int64_t block, std::int64_t expert, const tensor& x) {
  if (expert < 0 || expert >= config_.n_routed_experts)
    throw std::logic_error("expert_forward: expert " + std::to_string(expert) + " is not a routed expert");
  return swiglu(weights_.blocks.at(static_cast<std::size_t>(block)).experts[static_cast<std::size_t>(expert)], x);
}

void model::combine(const moe_routing& routing, std::int64_t expert, const tensor& y, tensor& out) {
  const auto& rows = routing.rows[static_cast<std::size_t>(expert)];
  const auto& gates = routing.gates[static_cast<std::size_t>(expert)];
  const auto n = static_cast<std::int64_t>(rows.size());
  tensor row_ids = tensor::empty({n}, dtype::i32);
  tensor gate_w = tensor::empty({n}, dtype::f32);
  std::copy(rows.begin(), rows.end(), row_ids.data<std::int32_t>());
  std::copy(gates.begin(), gates.end(), gate_w.data<float>());
  be_.scatter_add_rows(y, row_ids, gate_w, out);
}

tensor model::moe(std::int64_t block, const tensor& u) {
  tensor out = be_.empty({u.dim(0), config_.hidden_size}, dtype::f32);
  moe(block, u, out, write_mode::overwrite);
  return out;
}

void model::moe(std::int64_t block, const tensor& u, tensor& out, write_mode mode) {
  const auto& c = config_;
  const auto& w = weights_.blocks.at(static_cast<std::size_t>(block));
  if (u.dim(0) <= be_.routed_moe_rows()) {  // a few rows on a GPU: route and run the experts there
    std::vector<tensor> gate_up, down;
    for (const auto& e : w.experts) gate_up.push_back(e.gate_up), down.push_back(e.down);
    be_.routed_moe(u, {w.router, w.router_bias, static_cast<int>(c.moe_topk), static_cast<float>(c.routed_scaling_factor),
                       gate_up, down},
                   out, mode);
    return;
  }
  const moe_routing routing = route(block, u);
  if (mode == write_mode::overwrite) be_.zero(out);
  // In expert order; zero (identity) experts add their gated input and cost no GEMM.
  for (std::int64_t e = 0; e < c.num_router_experts(); ++e) {
    const auto& rows = routing.rows[static_cast<std::size_t>(e)];
    if (rows.empty()) continue;
    const tensor x = gather(u, rows);
    combine(routing, e, e < c.n_routed_experts ? expert_forward(block, e, x) : x, out);
  }
}

tensor model::head(const tensor& h) {
  tensor normed = norm(h, weights_.final_norm);
  tensor logits = be_.empty({normed.dim(0), config_.vocab_size}, dtype::f32);
  be_.linear(normed, weights_.lm_head, logits, write_mode::overwrite);
  return logits;
}

tensor model::mtp_forward(const tensor& tokens, const tensor& hidden, const step_layout& layout,
                          std::span<latent_cache* const> caches, latent_block_allocator& blocks) {
  if (!has_mtp()) throw input_error("the checkpoint has no MTP head (model.mtp.*)");
  const auto& m = weights_.mtp.front();
  const auto t = layout.total_rows;
  if (tokens.numel() != t || hidden.dim(0) != t || hidden.dim(1) != config_.hidden_size)
    throw std::logic_error("mtp_forward: tokens, hidden states and layout disagree");
  tensor e = be_.empty({t, config_.hidden_size}, dtype::f32);
  be_.gather_rows(weights_.embed, token_ids(tokens), e);  // the shared token embedding
  tensor x = be_.empty({t, config_.hidden_size}, dtype::f32);
  be_.linear(norm(e, m.enorm), m.eh_embed, x, write_mode::overwrite);  // eh_proj([enorm(e); hnorm(h)])
  const tensor h = hidden.where() == be_.where() ? hidden : be_.upload(hidden, dtype::f32);  // the scheduler's host copy
  be_.linear(norm(h, m.hnorm), m.eh_hidden, x, write_mode::accumulate);
  tensor a = attention(m.attention, norm(x, m.input_norm), page(layout, caches, blocks));
  tensor normed = be_.empty(a.shape(), dtype::f32);
  be_.add_rms_norm(a, x, m.post_attention_norm, eps(), normed);  // a = x + MLA(RMS(x))
  tensor out = swiglu(m.mlp, normed);
  be_.add(out, a);  // a + MLP(RMS(a))
  return out;
}

tensor model::mtp_logits(const tensor& h) {
  if (!has_mtp()) throw input_error("the checkpoint has no MTP head (model.mtp.*)");
  tensor normed = norm(h, weights_.mtp.front().norm);
  tensor logits = be_.empty({normed.dim(0), config_.vocab_size}, dtype::f32);
  be_.linear(normed, weights_.lm_head, logits, write_mode::overwrite);
  return logits;
}

void model::check_room(const sequence_state& state, std::int64_t rows) const {
  const auto limit = config_.max_position_embeddings;
  if (limit && state.num_tokens + rows > limit)
    throw input_error("sequence of " + std::to_string(state.num_tokens + rows) + " tokens exceeds max_position_embeddings = " +
                      std::to_string(limit));
}

tensor model::step_logits(std::span<const step_input> batch, logits_mode mode, std::vector<std::int64_t>& rows) {
  const auto& c = config_;
  std::vector<std::int64_t> num_rows, first_position;
  for (const auto& in : batch) {
    num_rows.push_back(static_cast<std::int64_t>(in.tokens.size()));
    first_position.push_back(in.state->num_tokens);
    check_room(*in.state, num_rows.back());
  }
  const step_layout layout = step_layout::make(num_rows, first_position);
  tensor tokens = tensor::empty({layout.total_rows}, dtype::i32);
  std::vector<ngram_context*> contexts;
  for (std::size_t i = 0; i < batch.size(); ++i) {
    std::copy(batch[i].tokens.begin(), batch[i].tokens.end(), tokens.data<std::int32_t>() + layout.row_begin[i]);
    contexts.push_back(&batch[i].state->ngram);
    if (batch[i].state->latents.empty()) batch[i].state->latents.resize(static_cast<std::size_t>(c.num_attention_layers()));
  }
  // Decode and verification steps replay recordings; a step where some sequence brings many
  // tokens (prefill) runs op by op: it is compute-bound, and the recorded head would score
  // every row where the op-by-op one scores only the last of each sequence.
  const bool decode_like = *std::max_element(num_rows.begin(), num_rows.end()) <= max_recorded_rows_per_sequence;
  if (recorded_steps_ && be_.records() && decode_like && layout.total_rows <= be_.routed_moe_rows()) {
    tensor all = forward_recorded(tokens, layout, batch, contexts);
    for (const auto& in : batch) in.state->num_tokens += static_cast<std::int64_t>(in.tokens.size());
    rows.resize(static_cast<std::size_t>(layout.total_rows));
    std::iota(rows.begin(), rows.end(), 0);
    if (mode == logits_mode::last_token) rows = layout.last_rows();
    return all;
  }
  std::vector<latent_cache*> caches(batch.size());
  tensor h = blocks(embed(tokens, layout, contexts), [&](std::int64_t layer) {
    for (std::size_t i = 0; i < batch.size(); ++i) caches[i] = &batch[i].state->latents[static_cast<std::size_t>(layer)];
    return page(layout, caches, plain_blocks_);
  });
  for (const auto& in : batch) in.state->num_tokens += static_cast<std::int64_t>(in.tokens.size());
  if (mode == logits_mode::last_token) {
    const auto last = layout.last_rows();
    h = gather(h, std::vector<std::int32_t>(last.begin(), last.end()));
  }
  rows.resize(static_cast<std::size_t>(h.dim(0)));
  std::iota(rows.begin(), rows.end(), 0);
  return head(h);
}

tensor model::forward(std::span<const step_input> batch, logits_mode mode) {
  std::vector<std::int64_t> rows;
  const tensor all = be_.download(step_logits(batch, mode, rows));
  if (static_cast<std::int64_t>(rows.size()) == all.dim(0)) return all;
  const std::int64_t vocab = all.dim(1);
  tensor picked = tensor::empty({static_cast<std::int64_t>(rows.size()), vocab}, dtype::f32);
  for (std::size_t i = 0; i < rows.size(); ++i)
    std::copy_n(all.data<float>() + rows[i] * vocab, vocab, picked.data<float>() + static_cast<std::int64_t>(i) * vocab);
  return picked;
}

std::vector<std::int32_t> model::forward_argmax(std::span<const step_input> batch, logits_mode mode) {
  std::vector<std::int64_t> rows;
  const tensor logits = step_logits(batch, mode, rows);
  std::vector<token_draw> draws(rows.size());
  for (std::size_t i = 0; i < rows.size(); ++i) {
    draws[i].row = rows[i];
    draws[i].params.temperature = 0;
  }
  tensor picked = be_.empty({static_cast<std::int64_t>(rows.size())}, dtype::i32);
  be_.sample(logits, draws, picked);
  const tensor ids = be_.download(picked);
  return {ids.data<std::int32_t>(), ids.data<std::int32_t>() + ids.numel()};
}

std::vector<std::vector<std::int32_t>> model::draft_greedy(std::span<const step_input> batch, std::int64_t steps) {
  if (steps < 1) throw std::logic_error("draft_greedy: steps must be >= 1");
  std::int64_t rows = 0;
  std::size_t longest = 0;
  for (const auto& in : batch) {
    rows += static_cast<std::int64_t>(in.tokens.size());
    longest = std::max(longest, in.tokens.size());
  }
  if (steps > 1 && recorded_steps_ && be_.records() && tables_on_device() && rows <= be_.routed_moe_rows() &&
      longest <= static_cast<std::size_t>(max_recorded_rows_per_sequence))
    return draft_recorded(batch, steps);
  std::vector<std::vector<std::int32_t>> picks(batch.size());
  std::vector<step_input> in(batch.begin(), batch.end());
  for (std::int64_t j = 0; j < steps; ++j) {
    const auto ids = forward_argmax(in, logits_mode::last_token);
    for (std::size_t i = 0; i < in.size(); ++i) {
      picks[i].push_back(ids[i]);
      in[i].tokens = std::span(picks[i]).last(1);
    }
  }
  return picks;
}

}  // namespace troupe
