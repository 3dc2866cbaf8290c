#include "gpu/cpu/cpu_backend.hpp"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <stdexcept>
#include <thread>

#include "gpu/cpu/bf16_linear.hpp"
#include "gpu/cpu/host_allocator.hpp"
#include "gpu/cpu/thread_pool.hpp"

namespace troupe {
namespace {

[[noreturn]] void fail_argument(const char* op, const std::string& what) {
  throw std::invalid_argument(std::string("cpu_backend::") + op + ": " + what);
}

// Checks an op's arguments; the message is built only when the check fails (ops are hot).
#define TROUPE_EXPECT(ok, op, what)     \
  do {                                  \
    if (!(ok)) fail_argument(op, what); \
  } while (0)

std::string shapes(const tensor& a, const tensor& b) {
  return shape_to_string(a.shape()) + " vs " + shape_to_string(b.shape());
}

// Row r of `table` as float32 into dst (the table may be bf16/f16/f32, e.g. memory-mapped).
void read_row(const tensor& table, std::int64_t r, float* dst) {
  const std::int64_t cols = table.dim(1);
  const auto* base = static_cast<const std::byte*>(table.raw()) + r * cols * dtype_size(table.type());
  convert_to_f32(table.type(), base, dst, static_cast<std::size_t>(cols));
}

}  // namespace

cpu_backend::cpu_backend(int num_threads) : alloc_(std::make_shared<host_allocator>()) {
  const int threads = num_threads > 0 ? num_threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  openblas_set_num_threads(threads);
  pool_ = std::make_unique<thread_pool>(threads);
}

cpu_backend::~cpu_backend() = default;

int cpu_backend::num_threads() const { return pool_->size(); }

tensor cpu_backend::empty(shape_t shape, dtype type) { return alloc_->empty(std::move(shape), type); }

tensor cpu_backend::upload(const tensor& host, dtype type) {
  if (host.type() == type) {
    tensor out = tensor::empty(host.shape(), type);
    std::memcpy(out.raw(), host.raw(), host.nbytes());
    return out;
  }
  tensor f = host.to_f32();
  if (type == dtype::f32) return f;  // to_f32 of a non-f32 tensor is already a fresh copy
  tensor out = tensor::empty(host.shape(), type);
  convert_from_f32(type, f.data<float>(), out.raw(), static_cast<std::size_t>(f.numel()));
  return out;
}

tensor cpu_backend::download(const tensor& t) {
  tensor out = tensor::empty(t.shape(), t.type());
  std::memcpy(out.raw(), t.raw(), t.nbytes());
  return out;
}

void cpu_backend::copy_rows(const tensor& src, tensor& dst, std::int64_t dst_row) {
  TROUPE_EXPECT(src.type() == dst.type() && src.rank() == 2 && dst.rank() == 2 && src.dim(1) == dst.dim(1),
         "copy_rows", shapes(src, dst));
  TROUPE_EXPECT(dst_row >= 0 && dst_row + src.dim(0) <= dst.dim(0), "copy_rows", "rows out of range");
  const std::size_t row_bytes = static_cast<std::size_t>(dst.dim(1)) * dtype_size(dst.type());
  std::memcpy(static_cast<std::byte*>(dst.raw()) + dst_row * row_bytes, src.raw(), src.nbytes());
}

void cpu_backend::linear(const tensor& x, const tensor& w, tensor& y, write_mode mode) {
  TROUPE_EXPECT(x.rank() == 2 && w.rank() == 2 && y.rank() == 2, "linear", "rank-2 tensors expected");
  const auto m = x.dim(0), k = x.dim(1), n = w.dim(0);
  TROUPE_EXPECT(w.dim(1) == k && y.dim(0) == m && y.dim(1) == n, "linear",
         "x " + shape_to_string(x.shape()) + ", w " + shape_to_string(w.shape()) + ", y " + shape_to_string(y.shape()));
  if (m == 0) return;
  if (w.type() == dtype::bf16) {
    linear_bf16(x.data<float>(), w.data<std::uint16_t>(), y.data<float>(), m, n, k, mode == write_mode::accumulate, *pool_);
    return;
  }
  const float beta = mode == write_mode::accumulate ? 1.0f : 0.0f;
  if (m == 1) {
    cblas_sgemv(CblasRowMajor, CblasNoTrans, n, k, 1.0f, w.data<float>(), k, x.data<float>(), 1, beta,
                y.data<float>(), 1);
  } else {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, k, 1.0f, x.data<float>(), k, w.data<float>(), k, beta,
                y.data<float>(), n);
  }
}

void cpu_backend::rms_norm(const tensor& x, const tensor& w, float eps, tensor& y) {
  const auto rows = x.dim(0), cols = x.dim(1);
  TROUPE_EXPECT(w.numel() == cols && y.shape() == x.shape(), "rms_norm", shapes(x, y));
  const float* wp = w.data<float>();
  for (std::int64_t r = 0; r < rows; ++r) {
    const float* xr = x.data<float>() + r * cols;
    float* yr = y.data<float>() + r * cols;
    float ss = 0.0f;
    for (std::int64_t c = 0; c < cols; ++c) ss += xr[c] * xr[c];
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(cols) + eps);
    for (std::int64_t c = 0; c < cols; ++c) yr[c] = wp[c] * (xr[c] * inv);
  }
}

void cpu_backend::layer_norm(const tensor& x, float eps, tensor& y) {
  const auto rows = x.dim(0), cols = x.dim(1);
  TROUPE_EXPECT(y.shape() == x.shape(), "layer_norm", shapes(x, y));
  for (std::int64_t r = 0; r < rows; ++r) {
    const float* xr = x.data<float>() + r * cols;
    float* yr = y.data<float>() + r * cols;
    float mean = 0.0f, var = 0.0f;
    for (std::int64_t c = 0; c < cols; ++c) mean += xr[c];
    mean /= static_cast<float>(cols);
    for (std::int64_t c = 0; c < cols; ++c) var += (xr[c] - mean) * (xr[c] - mean);
    const float inv = 1.0f / std::sqrt(var / static_cast<float>(cols) + eps);
    for (std::int64_t c = 0; c < cols; ++c) yr[c] = (xr[c] - mean) * inv;
  }
}

void cpu_backend::add_rms_norm(tensor& y, const tensor& x, const tensor& w, float eps, tensor& normed) {
  add(y, x);
  rms_norm(y, w, eps, normed);
}

void cpu_backend::zero(tensor& y) { std::memset(y.raw(), 0, y.nbytes()); }

void cpu_backend::scale(tensor& y, float s) {
  float* p = y.data<float>();
  for (std::int64_t i = 0, n = y.numel(); i < n; ++i) p[i] *= s;
}

void cpu_backend::add(tensor& y, const tensor& x) {
  TROUPE_EXPECT(y.numel() == x.numel(), "add", shapes(y, x));
  float* p = y.data<float>();
  const float* q = x.data<float>();
  for (std::int64_t i = 0, n = y.numel(); i < n; ++i) p[i] += q[i];
}

void cpu_backend::swiglu(const tensor& gate_up, tensor& out) {
  const auto rows = gate_up.dim(0), f = out.dim(1);
  TROUPE_EXPECT(gate_up.dim(1) == 2 * f && out.dim(0) == rows, "swiglu", shapes(gate_up, out));
  for (std::int64_t r = 0; r < rows; ++r) {
    const float* g = gate_up.data<float>() + r * 2 * f;
    const float* u = g + f;
    float* o = out.data<float>() + r * f;
    for (std::int64_t c = 0; c < f; ++c) o[c] = g[c] / (1.0f + std::exp(-g[c])) * u[c];
  }
}

void cpu_backend::gather_rows(const tensor& table, const tensor& ids, tensor& out) {
  const auto n = ids.numel();
  TROUPE_EXPECT(out.dim(0) == n && out.dim(1) == table.dim(1), "gather_rows", shapes(table, out));
  const auto* id = ids.data<std::int64_t>();
  for (std::int64_t r = 0; r < n; ++r) {
    TROUPE_EXPECT(id[r] >= 0 && id[r] < table.dim(0), "gather_rows",
           "row id " + std::to_string(id[r]) + " outside a table of " + std::to_string(table.dim(0)) + " rows");
    read_row(table, id[r], out.data<float>() + r * out.dim(1));
  }
}

void cpu_backend::scatter_add_rows(const tensor& x, const tensor& rows, const tensor& weights, tensor& out) {
  const auto n = x.dim(0), cols = x.dim(1);
  TROUPE_EXPECT(rows.numel() == n && weights.numel() == n && out.dim(1) == cols, "scatter_add_rows", shapes(x, out));
  const auto* row = rows.data<std::int32_t>();
  const auto* w = weights.data<float>();
  for (std::int64_t r = 0; r < n; ++r) {
    float* o = out.data<float>() + static_cast<std::int64_t>(row[r]) * cols;
    const float* xr = x.data<float>() + r * cols;
    for (std::int64_t c = 0; c < cols; ++c) o[c] += w[r] * xr[c];
  }
}

namespace {

// Rotates, in place, the interleaved pairs of columns [offset, offset + rope) of every head
// block (width head_stride) of x[T, heads * head_stride] at the rows' positions.
void rope_rows(tensor& x, std::int64_t num_heads, std::int64_t head_stride, std::int64_t offset, const tensor& positions,
               const rope_table& rope) {
  const auto t = x.dim(0), half = rope.inv_freq.numel();
  TROUPE_EXPECT(x.dim(1) == num_heads * head_stride && offset + 2 * half <= head_stride && positions.numel() == t, "rope",
                "x " + shape_to_string(x.shape()) + " with " + std::to_string(2 * half) + " rope columns");
  const float* freq = rope.inv_freq.data<float>();
  std::vector<float> cos_v(half), sin_v(half);
  for (std::int64_t r = 0; r < t; ++r) {
    const auto pos = static_cast<float>(positions.data<std::int64_t>()[r]);
    for (std::int64_t i = 0; i < half; ++i) {
      const float angle = pos * freq[i];
      cos_v[i] = std::cos(angle) * rope.attention_factor;
      sin_v[i] = std::sin(angle) * rope.attention_factor;
    }
    for (std::int64_t h = 0; h < num_heads; ++h) {
      float* p = x.data<float>() + r * x.dim(1) + h * head_stride + offset;
      for (std::int64_t i = 0; i < half; ++i) {
        const float a = p[2 * i], b = p[2 * i + 1];
        p[2 * i] = a * cos_v[i] - b * sin_v[i];
        p[2 * i + 1] = b * cos_v[i] + a * sin_v[i];
      }
    }
  }
}

// Block b of sequence s in a paged cache.
float* cache_block(const paged_latents& c, std::int64_t s, std::int64_t b) {
  return reinterpret_cast<float*>(c.block_table.data<std::int64_t>()[s * c.block_table.dim(1) + b]);
}

void check_paged(const paged_latents& c, std::int64_t rows) {
  TROUPE_EXPECT(c.block_table.rank() == 2 && c.row_seq.numel() == rows && c.positions.numel() == rows && c.block_tokens > 0,
                "paged_latents", "a block table " + shape_to_string(c.block_table.shape()) + " for " + std::to_string(rows) +
                                     " rows");
  for (std::int64_t r = 0; r < rows; ++r) {
    const auto s = c.row_seq.data<std::int32_t>()[r];
    const auto pos = c.positions.data<std::int64_t>()[r];
    TROUPE_EXPECT(s >= 0 && s < c.block_table.dim(0) && pos >= 0 && pos < c.max_keys &&
                      pos / c.block_tokens < c.block_table.dim(1) && cache_block(c, s, pos / c.block_tokens),
                  "paged_latents", "row " + std::to_string(r) + " (sequence " + std::to_string(s) + ", position " +
                                       std::to_string(pos) + ") has no cache block");
  }
}

}  // namespace

void cpu_backend::write_latents(tensor& kv, const latent_norm& norm, const rope_table& rope, const paged_latents& where) {
  const auto rows = kv.dim(0), width = kv.dim(1), cols = norm.weight.numel();
  TROUPE_EXPECT(cols + 2 * rope.inv_freq.numel() == width, "write_latents",
                "kv " + shape_to_string(kv.shape()) + " for a latent norm of " + std::to_string(cols) + " columns");
  check_paged(where, rows);
  const float* w = norm.weight.data<float>();
  for (std::int64_t r = 0; r < rows; ++r) {
    float* xr = kv.data<float>() + r * width;
    float ss = 0.0f;
    for (std::int64_t c = 0; c < cols; ++c) ss += xr[c] * xr[c];
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(cols) + norm.eps);
    for (std::int64_t c = 0; c < cols; ++c) xr[c] = (w[c] * (xr[c] * inv)) * norm.post_scale;
  }
  rope_rows(kv, 1, width, cols, where.positions, rope);
  for (std::int64_t r = 0; r < rows; ++r) {
    const auto pos = where.positions.data<std::int64_t>()[r];
    float* block = cache_block(where, where.row_seq.data<std::int32_t>()[r], pos / where.block_tokens);
    std::memcpy(block + (pos % where.block_tokens) * width, kv.data<float>() + r * width, static_cast<std::size_t>(width) * sizeof(float));
  }
}

void cpu_backend::mla_attention(const tensor& q_in, const tensor& kv_b, const paged_latents& cache, const mla_dims& d,
                                const rope_table& rope, float softmax_scale, tensor& out) {
  const std::int64_t qk = d.nope_dim + d.rope_dim;
  const std::int64_t lat_w = d.kv_lora_rank + d.rope_dim;
  tensor q = tensor::empty(q_in.shape(), dtype::f32);  // rotated here; the caller's q stays as it was
  std::memcpy(q.raw(), q_in.raw(), q_in.nbytes());
  TROUPE_EXPECT(q.dim(1) == d.num_heads * qk && out.dim(1) == d.num_heads * d.v_dim && out.dim(0) == q.dim(0),
         "mla_attention", "q " + shape_to_string(q.shape()) + ", out " + shape_to_string(out.shape()));
  TROUPE_EXPECT(kv_b.dim(0) == d.num_heads * (d.nope_dim + d.v_dim) && kv_b.dim(1) == d.kv_lora_rank, "mla_attention",
         "kv_b " + shape_to_string(kv_b.shape()));
  check_paged(cache, q.dim(0));
  rope_rows(q, d.num_heads, qk, d.nope_dim, cache.positions, rope);
  const float* wkv = kv_b.data<float>();
  const auto* seq_of = cache.row_seq.data<std::int32_t>();
  const auto* pos_of = cache.positions.data<std::int64_t>();
  const std::int64_t block = cache.block_tokens;
  std::vector<float> q_lat, scores, out_lat;
  // Runs of rows of one sequence at consecutive positions share their keys: one GEMM per run.
  for (std::int64_t begin = 0, end; begin < q.dim(0); begin = end) {
    end = begin + 1;
    while (end < q.dim(0) && seq_of[end] == seq_of[begin] && pos_of[end] == pos_of[end - 1] + 1) ++end;
    const std::int64_t rows = end - begin, first = pos_of[begin], keys = first + rows, s = seq_of[begin];
    q_lat.resize(rows * d.kv_lora_rank);
    scores.resize(rows * keys);
    out_lat.resize(rows * d.kv_lora_rank);
    for (std::int64_t h = 0; h < d.num_heads; ++h) {
      const float* qh = q.data<float>() + begin * q.dim(1) + h * qk;
      const float* w_k = wkv + h * (d.nope_dim + d.v_dim) * d.kv_lora_rank;  // [nope, kv_lora]
      const float* w_v = w_k + d.nope_dim * d.kv_lora_rank;                   // [v, kv_lora]
      // Absorb kv_b into the query: q_lat = q_nope . W_k, so q_nope . k_nope = q_lat . latent.
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, d.kv_lora_rank, d.nope_dim, 1.0f, qh, q.dim(1),
                  w_k, d.kv_lora_rank, 0.0f, q_lat.data(), d.kv_lora_rank);
      for (std::int64_t k0 = 0, b = 0; k0 < keys; k0 += block, ++b) {  // scores, block by block
        const std::int64_t n = std::min(block, keys - k0);
        const float* lat = cache_block(cache, s, b);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, n, d.kv_lora_rank, 1.0f, q_lat.data(),
                    d.kv_lora_rank, lat, lat_w, 0.0f, scores.data() + k0, keys);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, n, d.rope_dim, 1.0f, qh + d.nope_dim, q.dim(1),
                    lat + d.kv_lora_rank, lat_w, 1.0f, scores.data() + k0, keys);
      }
      for (std::int64_t r = 0; r < rows; ++r) {
        float* sr = scores.data() + r * keys;
        const std::int64_t visible = first + r + 1;  // causal
        float mx = -INFINITY;
        for (std::int64_t c = 0; c < visible; ++c) mx = std::max(mx, sr[c] * softmax_scale);
        float sum = 0.0f;
        for (std::int64_t c = 0; c < visible; ++c) sum += (sr[c] = std::exp(sr[c] * softmax_scale - mx));
        const float inv = 1.0f / sum;
        for (std::int64_t c = 0; c < visible; ++c) sr[c] *= inv;
        std::fill(sr + visible, sr + keys, 0.0f);
      }
      for (std::int64_t k0 = 0, b = 0; k0 < keys; k0 += block, ++b) {  // attended latent, block by block
        const std::int64_t n = std::min(block, keys - k0);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, d.kv_lora_rank, n, 1.0f, scores.data() + k0, keys,
                    cache_block(cache, s, b), lat_w, b ? 1.0f : 0.0f, out_lat.data(), d.kv_lora_rank);
      }
      // Expand the attended latent through W_v: out_h = out_lat . W_v^T.
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, d.v_dim, d.kv_lora_rank, 1.0f, out_lat.data(),
                  d.kv_lora_rank, w_v, d.kv_lora_rank, 0.0f, out.data<float>() + begin * out.dim(1) + h * d.v_dim,
                  out.dim(1));
    }
  }
}

void cpu_backend::router_topk(const tensor& logits, const tensor& bias, int k, float scaling, tensor& idx,
                              tensor& weights) {
  const auto t = logits.dim(0), e = logits.dim(1);
  TROUPE_EXPECT(bias.numel() == e && k > 0 && k <= e && idx.dim(0) == t && idx.dim(1) == k && weights.dim(1) == k,
         "router_topk", "logits " + shape_to_string(logits.shape()) + ", k " + std::to_string(k));
  std::vector<float> p(e), choice(e);
  std::vector<std::int32_t> order(e);
  for (std::int64_t r = 0; r < t; ++r) {
    const float* lr = logits.data<float>() + r * e;
    const float mx = *std::max_element(lr, lr + e);
    float sum = 0.0f;
    for (std::int64_t j = 0; j < e; ++j) sum += (p[j] = std::exp(lr[j] - mx));
    for (std::int64_t j = 0; j < e; ++j) {
      p[j] /= sum;
      choice[j] = p[j] + bias.data<float>()[j];
    }
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](std::int32_t a, std::int32_t b) {
      return choice[a] > choice[b] || (choice[a] == choice[b] && a < b);
    });
    for (int j = 0; j < k; ++j) {
      idx.data<std::int32_t>()[r * k + j] = order[j];
      weights.data<float>()[r * k + j] = p[order[j]] * scaling;
    }
  }
}

void cpu_backend::routed_moe(const tensor& u, const moe_layer& moe, tensor& out, write_mode mode) {
  const auto t = u.dim(0), h = u.dim(1), k = static_cast<std::int64_t>(moe.top_k);
  const auto n_routed = static_cast<std::int32_t>(moe.gate_up.size());
  TROUPE_EXPECT(out.shape() == u.shape() && moe.gate_up.size() == moe.down.size() && moe.router.dim(1) == h, "routed_moe",
                "u " + shape_to_string(u.shape()) + ", router " + shape_to_string(moe.router.shape()));
  tensor logits = tensor::empty({t, moe.router.dim(0)}, dtype::f32);
  linear(u, moe.router, logits, write_mode::overwrite);
  tensor idx = tensor::empty({t, k}, dtype::i32), gates = tensor::empty({t, k}, dtype::f32);
  router_topk(logits, moe.bias, moe.top_k, moe.scaling, idx, gates);
  const auto& gate_up = moe.gate_up;
  const auto& down = moe.down;
  if (mode == write_mode::overwrite) zero(out);
  for (std::int64_t r = 0; r < t; ++r) {
    const tensor x = u.rows(r, r + 1);
    tensor o = out.rows(r, r + 1);
    for (std::int64_t j = 0; j < k; ++j) {
      const std::int32_t e = idx.data<std::int32_t>()[r * k + j];
      const float g = gates.data<float>()[r * k + j];
      tensor y = tensor::empty({1, h}, dtype::f32);
      if (e < n_routed) {
        const auto f = down[static_cast<std::size_t>(e)].dim(1);
        tensor gu = tensor::empty({1, 2 * f}, dtype::f32), act = tensor::empty({1, f}, dtype::f32);
        linear(x, gate_up[static_cast<std::size_t>(e)], gu, write_mode::overwrite);
        swiglu(gu, act);
        linear(act, down[static_cast<std::size_t>(e)], y, write_mode::overwrite);
      } else {
        std::copy_n(x.data<float>(), h, y.data<float>());  // a zero expert: the input itself
      }
      for (std::int64_t c = 0; c < h; ++c) o.data<float>()[c] += g * y.data<float>()[c];
    }
  }
}

}  // namespace troupe
