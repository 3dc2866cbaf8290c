#include "training/stage_model.hpp"

#include <algorithm>
#include <cmath>

#include "model/init_model.hpp"
#include "model/rope.hpp"
#include "model/safetensors.hpp"
#include "model/sampler.hpp"
#include "model/weights.hpp"
#include "protocol/errors.hpp"

namespace troupe::train {
namespace {

// Block of a layer tensor name ("model.layers.{l}."), or -1.
std::int64_t block_of(const std::string& name) {
  static const std::string prefix = "model.layers.";
  if (name.compare(0, prefix.size(), prefix) != 0) return -1;
  return std::stoll(name.substr(prefix.size()));
}

}  // namespace

stage_range stage_range::split(std::int64_t num_layers, std::int64_t num_stages, std::int64_t index) {
  if (num_stages < 1 || num_stages > num_layers)
    throw input_error("cannot split " + std::to_string(num_layers) + " blocks into " + std::to_string(num_stages) +
                      " pipeline stages (each stage needs at least one block)");
  const std::int64_t base = num_layers / num_stages, extra = num_layers % num_stages;
  stage_range r;
  r.first_block = index * base + std::min(index, extra);
  r.end_block = r.first_block + base + (index < extra ? 1 : 0);
  r.embedding = index == 0;
  r.head = index == num_stages - 1;
  return r;
}

std::vector<parameter_spec> stage_parameters(const model_config& config, const stage_range& range) {
  std::vector<parameter_spec> out;
  for (const auto& spec : weight_specs(config)) {
    const auto b = block_of(spec.name);
    const bool mine = b >= 0 ? (b >= range.first_block && b < range.end_block)
                             : (spec.name.rfind("model.embed_tokens", 0) == 0 || spec.name.rfind("model.ngram_embeddings", 0) == 0
                                    ? range.embedding
                                    : range.head);
    if (!mine) continue;
    param_role role = param_role::matrix;
    if (spec.name == "model.embed_tokens.weight" || spec.name.find(".embedders.") != std::string::npos) role = param_role::table;
    else if (spec.name.ends_with("e_score_correction_bias")) role = param_role::router_bias;
    else if (spec.shape.size() == 1) role = param_role::norm;
    out.push_back({spec.name, spec.shape, role});
  }
  return out;
}

template <class T>
void init_parameter(const std::string& name, param_role role, const shape_t& shape, std::int64_t num_layers,
                    std::uint64_t seed, std::span<T> values) {
  rng gen(tensor_seed(seed, name));
  const double fan_in = static_cast<double>(shape.size() > 1 ? shape[1] : 1);
  double stddev = 1.0 / std::sqrt(fan_in);
  // n-gram rows never seen in training keep their initial values (lazy updates, no decay)
  // and still sum into every embedding whose hash lands there: start them small.
  const double table_std = name.find(".embedders.") != std::string::npos ? 0.02 : 1.0;
  if (name.ends_with("o_proj.weight") || name.ends_with("down_proj.weight"))
    stddev *= 1.0 / std::sqrt(2.0 * static_cast<double>(num_layers));
  for (auto& v : values) {
    switch (role) {
      case param_role::table: v = static_cast<T>(gen.normal() * table_std); break;
      case param_role::matrix: v = static_cast<T>(gen.normal() * stddev); break;
      case param_role::norm: v = T(1); break;
      case param_role::router_bias: v = T(0); break;
    }
  }
}

template <class T>
stage_model<T>::stage_model(const model_config& config, stage_range range) : config_(config), range_(range) {
  if (config_.tie_word_embeddings)
    throw input_error("training: tie_word_embeddings is not supported (the embedding and lm_head live on different stages)");
  for (const auto& spec : stage_parameters(config_, range_)) {
    parameter<T> p;
    p.name = spec.name;
    p.shape = spec.shape;
    p.role = spec.role;
    std::int64_t n = 1;
    for (auto d : spec.shape) n *= d;
    p.value.assign(static_cast<std::size_t>(n), T(0));
    p.grad.assign(static_cast<std::size_t>(n), T(0));
    if (p.role == param_role::table) p.touched.assign(static_cast<std::size_t>(spec.shape[0]), 0);
    params_.push_back(std::move(p));
    by_name_[params_.back().name] = &params_.back();
  }

  const T eps = static_cast<T>(config_.rms_norm_eps);
  if (range_.embedding) {
    embedding_.config = &config_;
    embedding_.base = &parameter_named("model.embed_tokens.weight");
    for (std::int64_t i = 0; i < config_.num_ngram_tables(); ++i) {
      embedding_.tables.push_back(&parameter_named("model.ngram_embeddings.embedders." + std::to_string(i) + ".weight"));
      embedding_.projections.push_back(&parameter_named("model.ngram_embeddings.post_projs." + std::to_string(i) + ".weight"));
    }
  }
  for (std::int64_t l = range_.first_block; l < range_.end_block; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    block b;
    for (int j = 0; j < 2; ++j) {
      const std::string s = std::to_string(j);
      b.input_norm[j] = {&parameter_named(p + "input_layernorm." + s + ".weight"), eps};
      b.post_norm[j] = {&parameter_named(p + "post_attention_layernorm." + s + ".weight"), eps};
      auto& a = b.attention[j];
      const std::string at = p + "self_attn." + s + ".";
      if (config_.q_lora_rank) {
        a.q_a = &parameter_named(at + "q_a_proj.weight");
        a.q_a_norm = &parameter_named(at + "q_a_layernorm.weight");
        a.q_b = &parameter_named(at + "q_b_proj.weight");
      } else {
        a.q_b = &parameter_named(at + "q_proj.weight");
      }
      a.kv_a = &parameter_named(at + "kv_a_proj_with_mqa.weight");
      a.kv_a_norm = &parameter_named(at + "kv_a_layernorm.weight");
      a.kv_b = &parameter_named(at + "kv_b_proj.weight");
      a.o = &parameter_named(at + "o_proj.weight");
      a.config = &config_;
      const std::string m = p + "mlps." + s + ".";
      b.mlp[j] = {&parameter_named(m + "gate_proj.weight"), &parameter_named(m + "up_proj.weight"),
                  &parameter_named(m + "down_proj.weight")};
    }
    b.moe.router = &parameter_named(p + "mlp.router.classifier.weight");
    b.moe.router_bias = &parameter_named(p + "mlp.router.e_score_correction_bias");
    b.moe.config = &config_;
    for (std::int64_t e = 0; e < config_.n_routed_experts; ++e) {
      const std::string x = p + "mlp.experts." + std::to_string(e) + ".";
      b.moe.experts.push_back({&parameter_named(x + "gate_proj.weight"), &parameter_named(x + "up_proj.weight"),
                               &parameter_named(x + "down_proj.weight")});
    }
    blocks_.push_back(std::move(b));
  }
  if (range_.head) head_ = {&parameter_named("model.norm.weight"), &parameter_named("lm_head.weight"), eps};
  softmax_scale_ = static_cast<T>(mla_softmax_scale(config_));
  reset_expert_load();
}

template <class T>
parameter<T>& stage_model<T>::parameter_named(const std::string& name) {
  auto it = by_name_.find(name);
  if (it == by_name_.end()) throw std::logic_error("stage_model: no parameter " + name + " on this stage");
  return *it->second;
}

template <class T>
void stage_model<T>::init(std::uint64_t seed) {
  for (auto& p : params_) init_parameter<T>(p.name, p.role, p.shape, config_.num_layers, seed, p.value);
}

template <class T>
void stage_model<T>::load(const checkpoint& ckpt) {
  for (auto& p : params_) {
    const tensor t = ckpt.get(p.name, p.shape);
    std::vector<float> f(static_cast<std::size_t>(t.numel()));
    convert_to_f32(t.type(), t.raw(), f.data(), f.size());
    std::transform(f.begin(), f.end(), p.value.begin(), [](float x) { return static_cast<T>(x); });
  }
}

template <class T>
void stage_model<T>::zero_grad() {
  for (auto& p : params_) {
    if (p.role == param_role::table) {
      const auto cols = p.cols();
      for (std::size_t r = 0; r < p.touched.size(); ++r)
        if (p.touched[r]) std::fill_n(p.grad.begin() + static_cast<std::int64_t>(r) * cols, cols, T(0));
      std::fill(p.touched.begin(), p.touched.end(), 0);
    } else {
      std::fill(p.grad.begin(), p.grad.end(), T(0));
    }
  }
}

template <class T>
void stage_model<T>::reset_expert_load() {
  expert_load_.assign(blocks_.size(), std::vector<std::int64_t>(static_cast<std::size_t>(config_.num_router_experts()), 0));
}

template <class T>
void stage_model<T>::add_expert_load(const std::vector<std::vector<std::int64_t>>& load) {
  if (load.size() != expert_load_.size()) throw std::logic_error("add_expert_load: block count");
  for (std::size_t b = 0; b < load.size(); ++b)
    for (std::size_t e = 0; e < load[b].size(); ++e) expert_load_[b].at(e) += load[b][e];
}

template <class T>
const rope_table<T>& stage_model<T>::rope_for(const batch_dims& dims) {
  if (!rope_ || rope_seq_len_ != dims.seq_len || rope_sequences_ != dims.sequences) {
    const rope_params rp = make_rope_params(config_);
    std::vector<std::int64_t> positions(static_cast<std::size_t>(dims.rows()));
    for (std::int64_t r = 0; r < dims.rows(); ++r) positions[static_cast<std::size_t>(r)] = r % dims.seq_len;
    rope_ = std::make_unique<rope_table<T>>(make_rope_table<T>(rp.inv_freq, rp.attention_factor, positions));
    rope_seq_len_ = dims.seq_len;
    rope_sequences_ = dims.sequences;
  }
  return *rope_;
}

template <class T>
buffer<T> stage_model<T>::block_forward(const block& b, std::span<const T> h, const batch_dims& dims,
                                        block_cache& c) const {
  const auto t = dims.rows();
  buffer<T> a = b.attention[0].forward(b.input_norm[0].forward(h, t, c.in_norm[0]), dims, c.attention[0]);
  for (std::size_t i = 0; i < a.size(); ++i) a[i] += h[i];  // a = h + MLA_0(RMS(h))
  const buffer<T> u = b.post_norm[0].forward(a, t, c.post_norm[0]);
  const buffer<T> moe = b.moe.forward(u, t, c.moe);
  buffer<T> x = b.mlp[0].forward(u, t, c.mlp[0]);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] += a[i];  // b = a + MLP_0(u)
  buffer<T> y = b.attention[1].forward(b.input_norm[1].forward(x, t, c.in_norm[1]), dims, c.attention[1]);
  for (std::size_t i = 0; i < y.size(); ++i) y[i] += x[i];  // c = b + MLA_1(RMS(b))
  buffer<T> out = b.mlp[1].forward(b.post_norm[1].forward(y, t, c.post_norm[1]), t, c.mlp[1]);
  for (std::size_t i = 0; i < out.size(); ++i) out[i] += y[i] + moe[i];  // (c + MLP_1(v)) + moe
  return out;
}

template <class T>
buffer<T> stage_model<T>::block_backward(const block& b, std::span<const T> dy, const batch_dims& dims,
                                         const block_cache& c) const {
  const auto t = dims.rows();
  const auto n = dy.size();
  // Through c + MLP_1(RMS(c)): dc = dy + RMS'(MLP_1'(dy)).
  buffer<T> dv(n, T(0)), dc(dy.begin(), dy.end());
  b.mlp[1].backward(dy, c.mlp[1], t, dv);
  b.post_norm[1].backward(dv, c.post_norm[1], t, dc);
  // Through b + MLA_1(RMS(b)).
  buffer<T> dn1(n, T(0)), db(dc);
  b.attention[1].backward(dc, c.attention[1], dims, dn1);
  b.input_norm[1].backward(dn1, c.in_norm[1], t, db);
  // Through a + MLP_0(u) and the MoE term (both read u).
  buffer<T> du(n, T(0)), da(db);
  b.mlp[0].backward(db, c.mlp[0], t, du);
  b.moe.backward(dy, c.moe, t, du);
  b.post_norm[0].backward(du, c.post_norm[0], t, da);
  // Through h + MLA_0(RMS(h)).
  buffer<T> dn0(n, T(0)), dh(da);
  b.attention[0].backward(da, c.attention[0], dims, dn0);
  b.input_norm[0].backward(dn0, c.in_norm[0], t, dh);
  return dh;
}

template <class T>
buffer<T> stage_model<T>::forward(std::int64_t id, std::span<const std::int32_t> tokens, std::span<const T> hidden,
                                  const batch_dims& dims, keep_activations keep) {
  const auto t = dims.rows();
  saved s;
  buffer<T> h;
  if (range_.embedding) {
    if (static_cast<std::int64_t>(tokens.size()) != t) throw std::logic_error("stage forward: token count");
    for (auto x : tokens)
      if (x < 0 || x >= config_.vocab_size)
        throw input_error("token id " + std::to_string(x) + " is outside the vocabulary of " + std::to_string(config_.vocab_size));
    h = embedding_.forward(tokens, dims, s.embedding);
  } else {
    if (static_cast<std::int64_t>(hidden.size()) != t * config_.hidden_size)
      throw std::logic_error("stage forward: hidden of " + std::to_string(hidden.size()) + " values for " + std::to_string(t) + " rows");
    h.assign(hidden.begin(), hidden.end());
  }
  const auto& rope = rope_for(dims);
  s.blocks.resize(blocks_.size());
  for (std::size_t i = 0; i < blocks_.size(); ++i) {
    for (auto& a : blocks_[i].attention) {
      a.rope = &rope;
      a.softmax_scale = softmax_scale_;
    }
    h = block_forward(blocks_[i], h, dims, s.blocks[i]);
  }
  if (keep == keep_activations::yes) {
    for (std::size_t i = 0; i < blocks_.size(); ++i)
      for (std::size_t e = 0; e < s.blocks[i].moe.rows.size(); ++e)
        expert_load_[i][e] += static_cast<std::int64_t>(s.blocks[i].moe.rows[e].size());
    saved_[id] = std::move(s);
  }
  return h;
}

template <class T>
double stage_model<T>::loss(std::int64_t id, std::span<const T> hidden, std::span<const std::int32_t> targets,
                            const batch_dims& dims, T weight, keep_activations keep, buffer<T>& grad_in) {
  if (!range_.head) throw std::logic_error("stage_model::loss on a stage without the head");
  if (keep == keep_activations::no) return head_.loss_and_backward(hidden, targets, dims.rows(), weight, {});
  buffer<T> dh(hidden.size(), T(0));
  const double total = head_.loss_and_backward(hidden, targets, dims.rows(), weight, dh);
  grad_in = backward(id, dh, dims);
  return total;
}

template <class T>
buffer<T> stage_model<T>::backward(std::int64_t id, std::span<const T> grad_out, const batch_dims& dims) {
  auto it = saved_.find(id);
  if (it == saved_.end()) throw std::logic_error("stage backward: no activations for micro-batch " + std::to_string(id));
  buffer<T> g(grad_out.begin(), grad_out.end());
  const auto& rope = rope_for(dims);
  for (std::size_t i = blocks_.size(); i-- > 0;) {
    for (auto& a : blocks_[i].attention) a.rope = &rope;
    g = block_backward(blocks_[i], g, dims, it->second.blocks[i]);
  }
  if (range_.embedding) {
    embedding_.backward(g, it->second.embedding, dims);
    g.clear();
  }
  saved_.erase(it);
  return g;
}

template void init_parameter<float>(const std::string&, param_role, const shape_t&, std::int64_t, std::uint64_t, std::span<float>);
template void init_parameter<double>(const std::string&, param_role, const shape_t&, std::int64_t, std::uint64_t, std::span<double>);
template class stage_model<float>;
template class stage_model<double>;

}  // namespace troupe::train
