#include "training/layers.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "model/ngram_hash.hpp"

namespace troupe::train {
namespace {

template <class T>
T sqrt_ratio(std::int64_t a, std::int64_t b) {
  return static_cast<T>(std::sqrt(static_cast<double>(a) / static_cast<double>(b)));
}

}  // namespace

// ---- RMSNorm -----------------------------------------------------------------------------

template <class T>
buffer<T> rms_norm_layer<T>::forward(std::span<const T> x, std::int64_t rows, cache& c) const {
  const auto cols = weight->rows();
  c.x.assign(x.begin(), x.end());
  c.rms_inv.resize(static_cast<std::size_t>(rows));
  buffer<T> y(x.size());
  rms_norm_forward<T>(x, weight->v(), rows, cols, cols, eps, T(1), y, c.rms_inv);
  return y;
}

template <class T>
void rms_norm_layer<T>::backward(std::span<const T> dy, const cache& c, std::int64_t rows, std::span<T> dx) const {
  const auto cols = weight->rows();
  rms_norm_backward<T>(dy, c.x, weight->v(), c.rms_inv, rows, cols, cols, T(1), dx, weight->g());
}

// ---- SwiGLU ------------------------------------------------------------------------------

template <class T>
buffer<T> swiglu_layer<T>::forward(std::span<const T> x, std::int64_t rows, cache& c) const {
  const auto h = gate->cols(), f = gate->rows();
  c.x.assign(x.begin(), x.end());
  c.gate.resize(static_cast<std::size_t>(rows * f));
  c.up.resize(c.gate.size());
  c.act.resize(c.gate.size());
  linear_forward<T>(x, gate->v(), rows, h, f, c.gate);
  linear_forward<T>(x, up->v(), rows, h, f, c.up);
  swiglu_forward<T>(c.gate, c.up, c.act);
  buffer<T> y(static_cast<std::size_t>(rows * h));
  linear_forward<T>(c.act, down->v(), rows, f, h, y);
  return y;
}

template <class T>
void swiglu_layer<T>::backward(std::span<const T> dy, const cache& c, std::int64_t rows, std::span<T> dx) const {
  const auto h = gate->cols(), f = gate->rows();
  buffer<T> dact(c.act.size()), dgate(c.act.size()), dup(c.act.size());
  linear_backward<T>(dy, c.act, down->v(), rows, f, h, dact, down->g());
  swiglu_backward<T>(dact, c.gate, c.up, dgate, dup);
  linear_backward<T>(dgate, c.x, gate->v(), rows, h, f, dx, gate->g());
  linear_backward<T>(dup, c.x, up->v(), rows, h, f, dx, up->g());
}

// ---- MLA ---------------------------------------------------------------------------------

namespace {

// Head h's keys of one sequence's rows [r0, r0 + s): key[j] = [k_nope_h(j) | k_rope(j)] [s, qk].
template <class T>
void gather_key(const typename mla_layer<T>::cache& c, const model_config& cf, std::int64_t r0, std::int64_t s,
                std::int64_t h, buffer<T>& key) {
  const auto heads = cf.num_attention_heads, nope = cf.qk_nope_head_dim, rope_dim = cf.qk_rope_head_dim;
  const auto qk = cf.qk_head_dim(), kvr = cf.kv_lora_rank, lat_w = kvr + rope_dim, kvb_w = nope + cf.v_head_dim;
  for (std::int64_t j = 0; j < s; ++j) {
    std::copy_n(c.kvb.begin() + (r0 + j) * heads * kvb_w + h * kvb_w, nope, key.begin() + j * qk);
    std::copy_n(c.k_lat.begin() + (r0 + j) * lat_w + kvr, rope_dim, key.begin() + j * qk + nope);
  }
}

}  // namespace

template <class T>
buffer<T> mla_layer<T>::forward(std::span<const T> x, const batch_dims& dims, cache& c) const {
  const auto& cf = *config;
  const auto t = dims.rows(), s = dims.seq_len, heads = cf.num_attention_heads, hidden = cf.hidden_size;
  const auto qk = cf.qk_head_dim(), nope = cf.qk_nope_head_dim, rope_dim = cf.qk_rope_head_dim, vd = cf.v_head_dim;
  const auto kvr = cf.kv_lora_rank, lat_w = kvr + rope_dim, kvb_w = nope + vd;
  const T eps = static_cast<T>(cf.rms_norm_eps);
  c.x.assign(x.begin(), x.end());

  c.q.resize(static_cast<std::size_t>(t * heads * qk));
  if (cf.q_lora_rank) {
    const auto qr = cf.q_lora_rank;
    c.q_lat.resize(static_cast<std::size_t>(t * qr));
    c.q_ln.resize(c.q_lat.size());
    c.q_lat_rms.resize(static_cast<std::size_t>(t));
    linear_forward<T>(x, q_a->v(), t, hidden, qr, c.q_lat);
    rms_norm_forward<T>(c.q_lat, q_a_norm->v(), t, qr, qr, eps, T(1), c.q_ln, c.q_lat_rms);
    linear_forward<T>(c.q_ln, q_b->v(), t, qr, heads * qk, c.q);
    if (cf.mla_scale_q_lora) {
      const T scale = sqrt_ratio<T>(hidden, qr);
      for (auto& v : c.q) v *= scale;
    }
  } else {
    linear_forward<T>(x, q_b->v(), t, hidden, heads * qk, c.q);
  }
  rope_apply<T>(c.q, *rope, t, heads, qk, nope, rope_direction::forward);

  c.kv.resize(static_cast<std::size_t>(t * lat_w));
  linear_forward<T>(x, kv_a->v(), t, hidden, lat_w, c.kv);
  // k_lat = RMS(kv[:, :kvr]) * scale; the rope columns are roped in a copy (k_lat's buffer).
  c.k_lat = c.kv;
  c.kv_rms.resize(static_cast<std::size_t>(t));
  const T kv_scale = cf.mla_scale_kv_lora ? sqrt_ratio<T>(hidden, kvr) : T(1);
  rms_norm_forward<T>(c.kv, kv_a_norm->v(), t, kvr, lat_w, eps, kv_scale, c.k_lat, c.kv_rms);
  rope_apply<T>(c.k_lat, *rope, t, 1, lat_w, kvr, rope_direction::forward);

  buffer<T> latent(static_cast<std::size_t>(t * kvr));
  for (std::int64_t r = 0; r < t; ++r)
    std::copy_n(c.k_lat.begin() + r * lat_w, kvr, latent.begin() + r * kvr);
  c.kvb.resize(static_cast<std::size_t>(t * heads * kvb_w));
  linear_forward<T>(latent, kv_b->v(), t, kvr, heads * kvb_w, c.kvb);

  c.probs.assign(static_cast<std::size_t>(dims.sequences * heads * s * s), T(0));
  c.attn.assign(static_cast<std::size_t>(t * heads * vd), T(0));
  buffer<T> key(static_cast<std::size_t>(s * qk));
  for (std::int64_t seq = 0; seq < dims.sequences; ++seq) {
    const auto r0 = seq * s;
    for (std::int64_t h = 0; h < heads; ++h) {
      gather_key<T>(c, *config, r0, s, h, key);
      T* p = c.probs.data() + (seq * heads + h) * s * s;
      matmul<T>(transpose::no, transpose::yes, s, s, qk, c.q.data() + r0 * heads * qk + h * qk, heads * qk, key.data(),
                qk, T(0), p, s);
      for (std::int64_t i = 0; i < s; ++i) {
        T* row = p + i * s;
        T mx = -std::numeric_limits<T>::infinity();
        for (std::int64_t j = 0; j <= i; ++j) mx = std::max(mx, row[j] * softmax_scale);
        T sum = 0;
        for (std::int64_t j = 0; j <= i; ++j) sum += (row[j] = std::exp(row[j] * softmax_scale - mx));
        for (std::int64_t j = 0; j <= i; ++j) row[j] /= sum;
        std::fill(row + i + 1, row + s, T(0));
      }
      matmul<T>(transpose::no, transpose::no, s, vd, s, p, s, c.kvb.data() + r0 * heads * kvb_w + h * kvb_w + nope,
                heads * kvb_w, T(0), c.attn.data() + r0 * heads * vd + h * vd, heads * vd);
    }
  }
  buffer<T> out(static_cast<std::size_t>(t * hidden));
  linear_forward<T>(c.attn, o->v(), t, heads * vd, hidden, out);
  return out;
}

template <class T>
void mla_layer<T>::backward(std::span<const T> dy, const cache& c, const batch_dims& dims, std::span<T> dx) const {
  const auto& cf = *config;
  const auto t = dims.rows(), s = dims.seq_len, heads = cf.num_attention_heads, hidden = cf.hidden_size;
  const auto qk = cf.qk_head_dim(), nope = cf.qk_nope_head_dim, rope_dim = cf.qk_rope_head_dim, vd = cf.v_head_dim;
  const auto kvr = cf.kv_lora_rank, lat_w = kvr + rope_dim, kvb_w = nope + vd;

  buffer<T> dattn(c.attn.size(), T(0));
  linear_backward<T>(dy, c.attn, o->v(), t, heads * vd, hidden, dattn, o->g());

  buffer<T> dq(c.q.size(), T(0)), dkvb(c.kvb.size(), T(0)), dk_lat(c.k_lat.size(), T(0));
  buffer<T> key(static_cast<std::size_t>(s * qk)), dkey(key.size()), dp(static_cast<std::size_t>(s * s));
  for (std::int64_t seq = 0; seq < dims.sequences; ++seq) {
    const auto r0 = seq * s;
    for (std::int64_t h = 0; h < heads; ++h) {
      gather_key<T>(c, *config, r0, s, h, key);
      const T* p = c.probs.data() + (seq * heads + h) * s * s;
      const T* d_out = dattn.data() + r0 * heads * vd + h * vd;
      const T* v = c.kvb.data() + r0 * heads * kvb_w + h * kvb_w + nope;
      // dP = dO V^T ; dV += P^T dO
      matmul<T>(transpose::no, transpose::yes, s, s, vd, d_out, heads * vd, v, heads * kvb_w, T(0), dp.data(), s);
      matmul<T>(transpose::yes, transpose::no, s, vd, s, p, s, d_out, heads * vd, T(1),
                dkvb.data() + r0 * heads * kvb_w + h * kvb_w + nope, heads * kvb_w);
      // dS = P * (dP - rowsum(dP * P)) * scale (zero above the diagonal, where P is 0)
      for (std::int64_t i = 0; i < s; ++i) {
        T dot = 0;
        for (std::int64_t j = 0; j <= i; ++j) dot += dp[i * s + j] * p[i * s + j];
        for (std::int64_t j = 0; j < s; ++j) dp[i * s + j] = j <= i ? p[i * s + j] * (dp[i * s + j] - dot) * softmax_scale : T(0);
      }
      // dQ += dS K ; dK = dS^T Q
      matmul<T>(transpose::no, transpose::no, s, qk, s, dp.data(), s, key.data(), qk, T(1),
                dq.data() + r0 * heads * qk + h * qk, heads * qk);
      matmul<T>(transpose::yes, transpose::no, s, qk, s, dp.data(), s, c.q.data() + r0 * heads * qk + h * qk,
                heads * qk, T(0), dkey.data(), qk);
      for (std::int64_t j = 0; j < s; ++j) {
        T* dkn = dkvb.data() + (r0 + j) * heads * kvb_w + h * kvb_w;
        for (std::int64_t d = 0; d < nope; ++d) dkn[d] += dkey[j * qk + d];
        T* dkr = dk_lat.data() + (r0 + j) * lat_w + kvr;  // the rope key is shared by every head
        for (std::int64_t d = 0; d < rope_dim; ++d) dkr[d] += dkey[j * qk + nope + d];
      }
    }
  }

  // Key side: kv_b, then the latent's norm and the rope columns, then kv_a.
  buffer<T> latent(static_cast<std::size_t>(t * kvr)), dlatent(latent.size(), T(0));
  for (std::int64_t r = 0; r < t; ++r) std::copy_n(c.k_lat.begin() + r * lat_w, kvr, latent.begin() + r * kvr);
  linear_backward<T>(dkvb, latent, kv_b->v(), t, kvr, heads * kvb_w, dlatent, kv_b->g());
  for (std::int64_t r = 0; r < t; ++r) std::copy_n(dlatent.begin() + r * kvr, kvr, dk_lat.begin() + r * lat_w);
  rope_apply<T>(dk_lat, *rope, t, 1, lat_w, kvr, rope_direction::inverse);
  buffer<T> dkv(c.kv.size(), T(0));
  for (std::int64_t r = 0; r < t; ++r)  // the rope columns pass through the norm untouched
    std::copy_n(dk_lat.begin() + r * lat_w + kvr, rope_dim, dkv.begin() + r * lat_w + kvr);
  const T kv_scale = cf.mla_scale_kv_lora ? sqrt_ratio<T>(hidden, kvr) : T(1);
  rms_norm_backward<T>(dk_lat, c.kv, kv_a_norm->v(), c.kv_rms, t, kvr, lat_w, kv_scale, dkv, kv_a_norm->g());
  linear_backward<T>(dkv, c.x, kv_a->v(), t, hidden, lat_w, dx, kv_a->g());

  // Query side.
  rope_apply<T>(dq, *rope, t, heads, qk, nope, rope_direction::inverse);
  if (cf.q_lora_rank) {
    const auto qr = cf.q_lora_rank;
    if (cf.mla_scale_q_lora) {
      const T scale = sqrt_ratio<T>(hidden, qr);
      for (auto& v : dq) v *= scale;
    }
    buffer<T> dq_ln(c.q_ln.size(), T(0)), dq_lat(c.q_lat.size(), T(0));
    linear_backward<T>(dq, c.q_ln, q_b->v(), t, qr, heads * qk, dq_ln, q_b->g());
    rms_norm_backward<T>(dq_ln, c.q_lat, q_a_norm->v(), c.q_lat_rms, t, qr, qr, T(1), dq_lat, q_a_norm->g());
    linear_backward<T>(dq_lat, c.x, q_a->v(), t, hidden, qr, dx, q_a->g());
  } else {
    linear_backward<T>(dq, c.x, q_b->v(), t, hidden, heads * qk, dx, q_b->g());
  }
}

// ---- Router and experts ------------------------------------------------------------------

template <class T>
buffer<T> moe_layer<T>::forward(std::span<const T> u, std::int64_t rows, cache& c) const {
  const auto& cf = *config;
  const auto hidden = cf.hidden_size, e = cf.num_router_experts(), k = cf.moe_topk;
  c.u.assign(u.begin(), u.end());
  c.probs.resize(static_cast<std::size_t>(rows * e));
  linear_forward<T>(u, router->v(), rows, hidden, e, c.probs);
  c.choice.resize(static_cast<std::size_t>(rows * k));
  c.gates.resize(c.choice.size());
  c.rows.assign(static_cast<std::size_t>(e), {});
  c.slots.assign(static_cast<std::size_t>(e), {});
  std::vector<T> score(static_cast<std::size_t>(e));
  std::vector<std::int32_t> order(static_cast<std::size_t>(e));
  const T scaling = static_cast<T>(cf.routed_scaling_factor);
  for (std::int64_t r = 0; r < rows; ++r) {
    T* p = c.probs.data() + r * e;
    const T mx = *std::max_element(p, p + e);
    T sum = 0;
    for (std::int64_t j = 0; j < e; ++j) sum += (p[j] = std::exp(p[j] - mx));
    for (std::int64_t j = 0; j < e; ++j) {
      p[j] /= sum;
      score[static_cast<std::size_t>(j)] = p[j] + router_bias->value[static_cast<std::size_t>(j)];
    }
    // The inference router's rule: highest biased score, lower id on ties.
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](std::int32_t a, std::int32_t b) {
      return score[static_cast<std::size_t>(a)] > score[static_cast<std::size_t>(b)] ||
             (score[static_cast<std::size_t>(a)] == score[static_cast<std::size_t>(b)] && a < b);
    });
    for (std::int64_t j = 0; j < k; ++j) {
      const auto x = order[static_cast<std::size_t>(j)];
      c.choice[static_cast<std::size_t>(r * k + j)] = x;
      c.gates[static_cast<std::size_t>(r * k + j)] = p[x] * scaling;
      c.rows[static_cast<std::size_t>(x)].push_back(static_cast<std::int32_t>(r));
      c.slots[static_cast<std::size_t>(x)].push_back(static_cast<std::int32_t>(j));
    }
  }
  buffer<T> out(static_cast<std::size_t>(rows * hidden), T(0));
  c.expert.assign(experts.size(), {});
  c.expert_out.assign(experts.size(), {});
  for (std::int64_t x = 0; x < e; ++x) {
    const auto& rs = c.rows[static_cast<std::size_t>(x)];
    if (rs.empty()) continue;
    const auto n = static_cast<std::int64_t>(rs.size());
    const T* y = nullptr;
    buffer<T> in;
    if (x < cf.n_routed_experts) {
      in.resize(static_cast<std::size_t>(n * hidden));
      for (std::int64_t i = 0; i < n; ++i) std::copy_n(u.begin() + rs[static_cast<std::size_t>(i)] * hidden, hidden, in.begin() + i * hidden);
      c.expert_out[static_cast<std::size_t>(x)] =
          experts[static_cast<std::size_t>(x)].forward(in, n, c.expert[static_cast<std::size_t>(x)]);
      y = c.expert_out[static_cast<std::size_t>(x)].data();
    }
    for (std::int64_t i = 0; i < n; ++i) {
      const auto r = rs[static_cast<std::size_t>(i)];
      const T g = c.gates[static_cast<std::size_t>(r * k + c.slots[static_cast<std::size_t>(x)][static_cast<std::size_t>(i)])];
      const T* src = y ? y + i * hidden : u.data() + r * hidden;  // zero experts: identity
      T* dst = out.data() + r * hidden;
      for (std::int64_t d = 0; d < hidden; ++d) dst[d] += g * src[d];
    }
  }
  return out;
}

template <class T>
void moe_layer<T>::backward(std::span<const T> dy, const cache& c, std::int64_t rows, std::span<T> du) const {
  const auto& cf = *config;
  const auto hidden = cf.hidden_size, e = cf.num_router_experts(), k = cf.moe_topk;
  const T scaling = static_cast<T>(cf.routed_scaling_factor);
  buffer<T> dprob(static_cast<std::size_t>(rows * e), T(0));
  for (std::int64_t x = 0; x < e; ++x) {
    const auto& rs = c.rows[static_cast<std::size_t>(x)];
    if (rs.empty()) continue;
    const auto n = static_cast<std::int64_t>(rs.size());
    const bool routed = x < cf.n_routed_experts;
    const T* y = routed ? c.expert_out[static_cast<std::size_t>(x)].data() : nullptr;
    buffer<T> dexpert(routed ? static_cast<std::size_t>(n * hidden) : 0);
    for (std::int64_t i = 0; i < n; ++i) {
      const auto r = rs[static_cast<std::size_t>(i)];
      const T g = c.gates[static_cast<std::size_t>(r * k + c.slots[static_cast<std::size_t>(x)][static_cast<std::size_t>(i)])];
      const T* d = dy.data() + r * hidden;
      const T* src = routed ? y + i * hidden : c.u.data() + r * hidden;
      T dgate = 0;
      for (std::int64_t j = 0; j < hidden; ++j) dgate += d[j] * src[j];
      dprob[static_cast<std::size_t>(r * e + x)] = dgate * scaling;
      if (routed) {
        for (std::int64_t j = 0; j < hidden; ++j) dexpert[static_cast<std::size_t>(i * hidden + j)] = g * d[j];
      } else {
        T* dst = du.data() + r * hidden;
        for (std::int64_t j = 0; j < hidden; ++j) dst[j] += g * d[j];
      }
    }
    if (routed) {
      buffer<T> din(static_cast<std::size_t>(n * hidden), T(0));
      experts[static_cast<std::size_t>(x)].backward(dexpert, c.expert[static_cast<std::size_t>(x)], n, din);
      for (std::int64_t i = 0; i < n; ++i) {
        T* dst = du.data() + rs[static_cast<std::size_t>(i)] * hidden;
        for (std::int64_t j = 0; j < hidden; ++j) dst[j] += din[static_cast<std::size_t>(i * hidden + j)];
      }
    }
  }
  // Softmax backward: dlogits = p * (dp - sum(p * dp)); the top-k choice itself has no gradient.
  buffer<T> dlogits(dprob.size());
  for (std::int64_t r = 0; r < rows; ++r) {
    const T* p = c.probs.data() + r * e;
    const T* dp = dprob.data() + r * e;
    T dot = 0;
    for (std::int64_t j = 0; j < e; ++j) dot += p[j] * dp[j];
    for (std::int64_t j = 0; j < e; ++j) dlogits[static_cast<std::size_t>(r * e + j)] = p[j] * (dp[j] - dot);
  }
  linear_backward<T>(dlogits, c.u, router->v(), rows, hidden, e, du, router->g());
}

// ---- Embedding ---------------------------------------------------------------------------

template <class T>
buffer<T> embedding_layer<T>::forward(std::span<const std::int32_t> tokens, const batch_dims& dims, cache& c) const {
  const auto& cf = *config;
  const auto t = dims.rows(), hidden = cf.hidden_size;
  const auto num_tables = static_cast<std::int64_t>(tables.size());
  c.tokens.assign(tokens.begin(), tokens.end());
  c.merged.assign(static_cast<std::size_t>(t * hidden), T(0));
  for (std::int64_t r = 0; r < t; ++r) {
    const auto x = tokens[static_cast<std::size_t>(r)];
    std::copy_n(base->value.begin() + static_cast<std::int64_t>(x) * hidden, hidden, c.merged.begin() + r * hidden);
  }
  if (num_tables) {
    const ngram_hasher hasher(cf);
    c.ngram_ids.resize(static_cast<std::size_t>(t * num_tables));
    for (std::int64_t seq = 0; seq < dims.sequences; ++seq) {  // each training sequence starts a fresh context
      ngram_context context;
      hasher.hash(tokens.subspan(static_cast<std::size_t>(seq * dims.seq_len), static_cast<std::size_t>(dims.seq_len)),
                  context, c.ngram_ids.data() + seq * dims.seq_len * num_tables);
    }
    c.gathered.assign(static_cast<std::size_t>(num_tables), {});
    buffer<T> projected(static_cast<std::size_t>(t * hidden));
    for (std::int64_t i = 0; i < num_tables; ++i) {
      const auto d = tables[static_cast<std::size_t>(i)]->cols();
      auto& rows = c.gathered[static_cast<std::size_t>(i)];
      rows.resize(static_cast<std::size_t>(t * d));
      for (std::int64_t r = 0; r < t; ++r)
        std::copy_n(tables[static_cast<std::size_t>(i)]->value.begin() + c.ngram_ids[static_cast<std::size_t>(r * num_tables + i)] * d,
                    d, rows.begin() + r * d);
      linear_forward<T>(rows, projections[static_cast<std::size_t>(i)]->v(), t, d, hidden, projected);
      for (std::size_t j = 0; j < projected.size(); ++j) c.merged[j] += projected[j];
    }
    const T inv = T(1) / static_cast<T>(1 + num_tables);
    for (auto& v : c.merged) v *= inv;
  }
  c.out = c.merged;
  switch (cf.embedding_amplification) {
    case amplification::none: break;
    case amplification::sqrt_hidden: {
      const T scale = static_cast<T>(std::sqrt(static_cast<double>(hidden)));
      for (auto& v : c.out) v *= scale;
      break;
    }
    case amplification::layer_norm:
      c.std_inv.resize(static_cast<std::size_t>(t));
      layer_norm_forward<T>(c.merged, t, hidden, static_cast<T>(cf.rms_norm_eps), c.out, c.std_inv);
      break;
  }
  return c.out;
}

template <class T>
void embedding_layer<T>::backward(std::span<const T> dy, const cache& c, const batch_dims& dims) const {
  const auto& cf = *config;
  const auto t = dims.rows(), hidden = cf.hidden_size;
  const auto num_tables = static_cast<std::int64_t>(tables.size());
  buffer<T> dmerged(dy.begin(), dy.end());
  switch (cf.embedding_amplification) {
    case amplification::none: break;
    case amplification::sqrt_hidden: {
      const T scale = static_cast<T>(std::sqrt(static_cast<double>(hidden)));
      for (auto& v : dmerged) v *= scale;
      break;
    }
    case amplification::layer_norm:
      std::fill(dmerged.begin(), dmerged.end(), T(0));
      layer_norm_backward<T>(dy, c.out, c.std_inv, t, hidden, dmerged);
      break;
  }
  if (num_tables) {
    const T inv = T(1) / static_cast<T>(1 + num_tables);
    for (auto& v : dmerged) v *= inv;
  }
  for (std::int64_t r = 0; r < t; ++r) {
    const auto x = c.tokens[static_cast<std::size_t>(r)];
    T* g = base->grad.data() + static_cast<std::int64_t>(x) * hidden;
    for (std::int64_t j = 0; j < hidden; ++j) g[j] += dmerged[static_cast<std::size_t>(r * hidden + j)];
    base->touched[static_cast<std::size_t>(x)] = 1;
  }
  for (std::int64_t i = 0; i < num_tables; ++i) {
    auto& table = *tables[static_cast<std::size_t>(i)];
    const auto d = table.cols();
    buffer<T> drows(static_cast<std::size_t>(t * d), T(0));
    linear_backward<T>(dmerged, c.gathered[static_cast<std::size_t>(i)], projections[static_cast<std::size_t>(i)]->v(), t,
                       d, hidden, drows, projections[static_cast<std::size_t>(i)]->g());
    for (std::int64_t r = 0; r < t; ++r) {
      const auto id = c.ngram_ids[static_cast<std::size_t>(r * num_tables + i)];
      T* g = table.grad.data() + id * d;
      for (std::int64_t j = 0; j < d; ++j) g[j] += drows[static_cast<std::size_t>(r * d + j)];
      table.touched[static_cast<std::size_t>(id)] = 1;
    }
  }
}

// ---- Head and loss -----------------------------------------------------------------------

template <class T>
double head_layer<T>::loss_and_backward(std::span<const T> h, std::span<const std::int32_t> targets, std::int64_t rows,
                                        T weight, std::span<T> dh) const {
  const auto hidden = norm->rows(), vocab = lm_head->rows();
  double total = 0;
  for (std::int64_t r0 = 0; r0 < rows; r0 += chunk_rows) {
    const auto n = std::min(chunk_rows, rows - r0);
    const auto x = h.subspan(static_cast<std::size_t>(r0 * hidden), static_cast<std::size_t>(n * hidden));
    buffer<T> normed(x.size()), rms_inv(static_cast<std::size_t>(n)), logits(static_cast<std::size_t>(n * vocab));
    rms_norm_forward<T>(x, norm->v(), n, hidden, hidden, eps, T(1), normed, rms_inv);
    linear_forward<T>(normed, lm_head->v(), n, hidden, vocab, logits);
    const bool grads = !dh.empty();
    buffer<T> dlogits(grads ? logits.size() : 0);
    total += cross_entropy<T>(logits, targets.subspan(static_cast<std::size_t>(r0), static_cast<std::size_t>(n)), n, vocab,
                              weight, dlogits);
    if (!grads) continue;
    buffer<T> dnormed(normed.size(), T(0));
    linear_backward<T>(dlogits, normed, lm_head->v(), n, hidden, vocab, dnormed, lm_head->g());
    rms_norm_backward<T>(dnormed, x, norm->v(), rms_inv, n, hidden, hidden, T(1),
                         dh.subspan(static_cast<std::size_t>(r0 * hidden), static_cast<std::size_t>(n * hidden)), norm->g());
  }
  return total;
}

template struct rms_norm_layer<float>;
template struct rms_norm_layer<double>;
template struct swiglu_layer<float>;
template struct swiglu_layer<double>;
template struct mla_layer<float>;
template struct mla_layer<double>;
template struct moe_layer<float>;
template struct moe_layer<double>;
template struct embedding_layer<float>;
template struct embedding_layer<double>;
template struct head_layer<float>;
template struct head_layer<double>;

}  // namespace troupe::train
