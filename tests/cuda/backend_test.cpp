// The CUDA backend against the CPU backend, op by op, on fresh random inputs (never zeros),
// by relative L2 error: float32 paths under 1e-5, paths with bf16 operands (the GPU rounds
// activations to bf16 for its GEMMs) under 1e-2; ids exactly. Outputs are poisoned with NaN
// before each overwriting op, so an unwritten element fails the comparison. Then the whole
// model: logits of a batched prefill and decode steps, and a greedy generation. Skips on
// machines without a GPU.
#include <gtest/gtest.h>

#include <array>
#include <cmath>
#include <limits>
#include <random>

#include "gpu/cpu/cpu_backend.hpp"
#include "gpu/cuda/cuda_backend.hpp"
#include "model/generator.hpp"
#include "model/model.hpp"
#include "model/ngram_hash.hpp"
#include "model/sampler.hpp"
#include "model/speculative.hpp"
#include "model/weights.hpp"
#include "tests/test_support.hpp"
#include "tokenizer/tokenizer.hpp"

namespace troupe {
namespace {

#define SKIP_WITHOUT_GPU() \
  if (!cuda_backend::available()) GTEST_SKIP() << "no CUDA device"

struct backends {
  cpu_backend cpu{1};
  cuda_backend gpu;
};

tensor random(shape_t shape, std::uint64_t seed, float scale = 1.0f) {
  tensor t = tensor::empty(std::move(shape), dtype::f32);
  rng g(seed);
  for (std::int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] = static_cast<float>(g.normal()) * scale;
  return t;
}

// A GPU tensor full of NaN, to catch elements an op fails to write.
tensor poisoned(cuda_backend& gpu, shape_t shape) {
  tensor t = tensor::empty(std::move(shape), dtype::f32);
  std::fill(t.data<float>(), t.data<float>() + t.numel(), std::numeric_limits<float>::quiet_NaN());
  return gpu.upload(t, dtype::f32);
}

double rel(backends& b, const tensor& gpu, const tensor& cpu) {
  const tensor g = b.gpu.download(gpu);
  EXPECT_EQ(g.numel(), cpu.numel());
  return test::relative_l2(g.data<float>(), cpu.data<float>(), static_cast<std::size_t>(cpu.numel()));
}

TEST(cuda_backend, linear_with_bf16_and_f32_weights) {
  SKIP_WITHOUT_GPU();
  backends b;
  const std::int64_t n = 72;
  for (std::int64_t m : {1, 3, 4, 7, 33, 130})
    for (std::int64_t k : {200, 203}) {  // 203: the GEMV's scalar path (K not a multiple of 8)
      const tensor x = random({m, k}, 1 + m), w = random({n, k}, 2 + m, 0.1f), y0 = random({m, n}, 3 + m);
      for (const dtype wt : {dtype::bf16, dtype::f32})
        for (const auto mode : {write_mode::overwrite, write_mode::accumulate}) {
          const tensor wc = b.cpu.upload(w, wt), wg = b.gpu.upload(w, wt);
          tensor yc = b.cpu.upload(y0, dtype::f32);
          tensor yg = mode == write_mode::overwrite ? poisoned(b.gpu, {m, n}) : b.gpu.upload(y0, dtype::f32);
          b.cpu.linear(x, wc, yc, mode);
          b.gpu.linear(b.gpu.upload(x, dtype::f32), wg, yg, mode);
          const double e = rel(b, yg, yc);
          // f32 weights, and bf16 weights with up to 4 rows (the GEMV: float32 activations, the
          // CPU's products): float32 accuracy; more rows (cuBLAS, bf16 activations): bf16's.
          const bool rounded = wt == dtype::bf16 && m > 4;
          EXPECT_LT(e, rounded ? 1e-2 : 1e-5) << "m " << m << " k " << k << (wt == dtype::bf16 ? " bf16" : " f32");
          if (rounded) EXPECT_GT(e, 1e-5) << "bf16 activations should round";  // the cuBLAS path ran
        }
    }
}

// Two projections of one input in one launch (MLA's q_a and kv_a): each output as linear() gives
// it, both poisoned first; beyond 8 rows the default's two cuBLAS GEMMs.
TEST(cuda_backend, linear_pair_projects_one_input_twice) {
  SKIP_WITHOUT_GPU();
  backends b;
  for (std::int64_t m : {1, 3, 4, 8})
    for (std::int64_t k : {200, 203}) {
      const tensor x = random({m, k}, 40 + m), w1 = random({72, k}, 41, 0.1f), w2 = random({37, k}, 42, 0.1f);
      tensor y1c = b.cpu.empty({m, 72}, dtype::f32), y2c = b.cpu.empty({m, 37}, dtype::f32);
      b.cpu.linear_pair(x, b.cpu.upload(w1, dtype::bf16), y1c, b.cpu.upload(w2, dtype::bf16), y2c);
      tensor y1g = poisoned(b.gpu, {m, 72}), y2g = poisoned(b.gpu, {m, 37});
      b.gpu.linear_pair(b.gpu.upload(x, dtype::f32), b.gpu.upload(w1, dtype::bf16), y1g, b.gpu.upload(w2, dtype::bf16), y2g);
      const double tol = m > 4 ? 1e-2 : 1e-5;
      EXPECT_LT(rel(b, y1g, y1c), tol) << "m " << m << " k " << k;
      EXPECT_LT(rel(b, y2g, y2c), tol) << "m " << m << " k " << k;
    }
}

TEST(cuda_backend, linear_swiglu_fuses_the_mlp_first_half) {
  SKIP_WITHOUT_GPU();
  backends b;
  const std::int64_t f = 40;
  for (std::int64_t m : {1, 3, 4, 8})  // up to 4 rows: the fused GEMV; 8: cuBLAS, then SwiGLU
    for (std::int64_t k : {200, 203}) {
      const tensor x = random({m, k}, 80 + m), w = random({2 * f, k}, 81 + m, 0.1f);
      tensor ac = tensor::empty({m, f}, dtype::f32), ag = poisoned(b.gpu, {m, f});
      b.cpu.linear_swiglu(x, b.cpu.upload(w, dtype::bf16), ac);
      b.gpu.linear_swiglu(b.gpu.upload(x, dtype::f32), b.gpu.upload(w, dtype::bf16), ag);
      EXPECT_LT(rel(b, ag, ac), m > 4 ? 1e-2 : 1e-5) << "m " << m << " k " << k;
    }
}

TEST(cuda_backend, norms_and_elementwise_ops) {
  SKIP_WITHOUT_GPU();
  backends b;
  const std::int64_t rows = 9, cols = 300;
  const tensor x = random({rows, cols}, 11), w = random({cols}, 12), other = random({rows, cols}, 13);
  const tensor xg = b.gpu.upload(x, dtype::f32), wg = b.gpu.upload(w, dtype::f32);
  {
    tensor yc = tensor::empty({rows, cols}, dtype::f32), yg = poisoned(b.gpu, {rows, cols});
    b.cpu.rms_norm(x, w, 1e-6f, yc);
    b.gpu.rms_norm(xg, wg, 1e-6f, yg);
    EXPECT_LT(rel(b, yg, yc), 1e-5) << "rms_norm";
  }
  {
    tensor yc = b.cpu.upload(x, dtype::f32), yg = b.gpu.upload(x, dtype::f32);
    tensor nc = tensor::empty({rows, cols}, dtype::f32), ng = poisoned(b.gpu, {rows, cols});
    b.cpu.add_rms_norm(yc, other, w, 1e-6f, nc);
    b.gpu.add_rms_norm(yg, b.gpu.upload(other, dtype::f32), wg, 1e-6f, ng);
    EXPECT_LT(rel(b, yg, yc), 1e-6) << "add_rms_norm's sum";
    EXPECT_LT(rel(b, ng, nc), 1e-5) << "add_rms_norm's norm";
  }
  {
    tensor yc = tensor::empty({rows, cols}, dtype::f32), yg = poisoned(b.gpu, {rows, cols});
    b.cpu.layer_norm(x, 1e-5f, yc);
    b.gpu.layer_norm(xg, 1e-5f, yg);
    EXPECT_LT(rel(b, yg, yc), 1e-5) << "layer_norm";
  }
  {
    tensor yc = b.cpu.upload(x, dtype::f32), yg = b.gpu.upload(x, dtype::f32);
    b.cpu.add(yc, other);
    b.gpu.add(yg, b.gpu.upload(other, dtype::f32));
    b.cpu.scale(yc, 0.37f);
    b.gpu.scale(yg, 0.37f);
    EXPECT_LT(rel(b, yg, yc), 1e-6) << "add, scale";
    b.gpu.zero(yg);
    const tensor z = b.gpu.download(yg);
    for (std::int64_t i = 0; i < z.numel(); ++i) ASSERT_EQ(z.data<float>()[i], 0.0f);
  }
  {
    const tensor gu = random({rows, 2 * 150}, 15);
    tensor yc = tensor::empty({rows, 150}, dtype::f32), yg = poisoned(b.gpu, {rows, 150});
    b.cpu.swiglu(gu, yc);
    b.gpu.swiglu(b.gpu.upload(gu, dtype::f32), yg);
    EXPECT_LT(rel(b, yg, yc), 1e-6) << "swiglu";
  }
}

// concurrently(): recorded, the side branch runs on a stream of its own. A long side chain (GEMVs
// up to 4 rows, cuBLAS beyond, on the side's own handle while the main branch uses the backend's)
// must be done before the op after the call reads it, and so must a branch nested in the main
// branch: every replay, on fresh inputs, equals the same ops run in turn op by op exactly, and
// the CPU within the operands' precision. A branch that throws while recording leaves the
// backend usable.
TEST(cuda_backend, concurrent_branches_join_before_later_ops) {
  SKIP_WITHOUT_GPU();
  backends b;
  const std::int64_t k = 512, chain = 12;
  const tensor w_side = random({k, k}, 41, 1.0f / 22.6f), w_main = random({k, k}, 42, 1.0f / 22.6f);  // ~unit gain
  const tensor side_c = b.cpu.upload(w_side, dtype::bf16), main_c = b.cpu.upload(w_main, dtype::bf16);
  const tensor side_g = b.gpu.upload(w_side, dtype::bf16), main_g = b.gpu.upload(w_main, dtype::bf16);
  for (const std::int64_t rows : {2, 12}) {
    auto run = [&](backend& be, const tensor& x, const tensor& ws, const tensor& wm) {
      tensor a = be.empty({rows, k}, dtype::f32), out = be.empty({rows, k}, dtype::f32);
      be.concurrently(
          [&] {
            tensor in = x;
            for (std::int64_t i = 0; i < chain; ++i) {
              be.linear(in, ws, a, write_mode::overwrite);
              in = a;
              a = be.empty({rows, k}, dtype::f32);
            }
            a = in;
          },
          [&] {
            tensor nested = be.empty({rows, k}, dtype::f32);
            be.concurrently([&] { be.linear(x, ws, nested, write_mode::overwrite); },
                            [&] { be.linear(x, wm, out, write_mode::overwrite); });
            be.add(out, nested);
          });
      be.add(out, a);
      return out;
    };
    tensor x_dev = b.gpu.empty({rows, k}, dtype::f32);
    auto recorded = b.gpu.record([&] { return run(b.gpu, x_dev, side_g, main_g); });
    for (int replay = 0; replay < 3; ++replay) {
      const tensor x = random({rows, k}, 50 + static_cast<std::uint64_t>(replay) + 10 * static_cast<std::uint64_t>(rows));
      b.gpu.copy_rows(x, x_dev, 0);
      recorded.ops->replay();
      const tensor got = b.gpu.download(recorded.out);
      const tensor in_turn = b.gpu.download(run(b.gpu, b.gpu.upload(x, dtype::f32), side_g, main_g));
      for (std::int64_t i = 0; i < got.numel(); ++i)
        ASSERT_EQ(got.data<float>()[i], in_turn.data<float>()[i]) << rows << " rows, replay " << replay << ", element " << i;
      const tensor cpu = run(b.cpu, x, side_c, main_c);
      // bf16 weights; beyond 4 rows cuBLAS rounds activations to bf16 at each of the chain's GEMMs.
      EXPECT_LT(test::relative_l2(got.data<float>(), cpu.data<float>(), static_cast<std::size_t>(cpu.numel())),
                rows > 4 ? 3e-2 : 1e-4)
          << rows << " rows";
    }
  }
  int calls = 0;  // record() runs the body twice: the warm-up, then the capture, which fails
  EXPECT_THROW(b.gpu.record([&] {
    b.gpu.concurrently([&] { if (++calls == 2) throw std::runtime_error("side branch fails"); }, [] {});
    return tensor();
  }),
               std::runtime_error);
  const tensor x = random({2, k}, 60);
  tensor y = b.gpu.empty({2, k}, dtype::f32), yc = tensor::empty({2, k}, dtype::f32);
  b.gpu.linear(b.gpu.upload(x, dtype::f32), main_g, y, write_mode::overwrite);  // the stream is whole again
  b.cpu.linear(x, main_c, yc, write_mode::overwrite);
  EXPECT_LT(rel(b, y, yc), 1e-5);
}

TEST(cuda_backend, gathers_scatters_and_the_ngram_embedding) {
  SKIP_WITHOUT_GPU();
  backends b;
  const tensor table = random({50, 24}, 21);
  tensor ids = tensor::empty({7}, dtype::i64);
  for (int i = 0; i < 7; ++i) ids.data<std::int64_t>()[i] = (i * 13 + 5) % 50;
  for (const dtype t : {dtype::bf16, dtype::f32}) {
    const tensor host_table = b.cpu.upload(table, t);  // a host table in that dtype
    tensor yc = tensor::empty({7, 24}, dtype::f32);
    b.cpu.gather_rows(host_table, ids, yc);
    for (const bool on_device : {true, false}) {
      tensor yg = poisoned(b.gpu, {7, 24});
      b.gpu.gather_rows(on_device ? b.gpu.upload(table, t) : host_table, ids, yg);
      EXPECT_EQ(rel(b, yg, yc), 0.0) << (on_device ? "device" : "host") << " table";
    }
  }
  {
    const tensor x = random({5, 24}, 22), w = random({5}, 23), out0 = random({12, 24}, 24);
    tensor rows = tensor::empty({5}, dtype::i32);
    for (int i = 0; i < 5; ++i) rows.data<std::int32_t>()[i] = (i * 7 + 2) % 12;
    tensor yc = b.cpu.upload(out0, dtype::f32), yg = b.gpu.upload(out0, dtype::f32);
    b.cpu.scatter_add_rows(x, rows, w, yc);
    b.gpu.scatter_add_rows(b.gpu.upload(x, dtype::f32), rows, w, yg);
    EXPECT_LT(rel(b, yg, yc), 1e-6) << "scatter_add_rows";
  }
  {
    // Base and tables in host memory (as memory-mapped), projections bf16 on the device.
    const std::int64_t t = 6, h = 48, d = 12;
    const tensor base = b.cpu.upload(random({40, h}, 25), dtype::bf16);
    std::vector<tensor> tables, proj_c, proj_g;
    for (int i = 0; i < 4; ++i) {
      tables.push_back(b.cpu.upload(random({30 + i, d}, 26 + i), dtype::bf16));
      const tensor p = random({h, d}, 40 + i, 0.3f);
      proj_c.push_back(b.cpu.upload(p, dtype::bf16));
      proj_g.push_back(b.gpu.upload(p, dtype::bf16));
    }
    tensor tokens = tensor::empty({t}, dtype::i64), ngram = tensor::empty({4, t}, dtype::i64);
    for (int r = 0; r < t; ++r) {
      tokens.data<std::int64_t>()[r] = (r * 11 + 3) % 40;
      for (int i = 0; i < 4; ++i) ngram.data<std::int64_t>()[i * t + r] = (r * 7 + i * 5) % 30;
    }
    tensor yc = tensor::empty({t, h}, dtype::f32), yg = poisoned(b.gpu, {t, h});
    b.cpu.ngram_embed(base, tokens, ngram, tables, proj_c, yc);
    b.gpu.ngram_embed(base, tokens, ngram, tables, proj_g, yg);
    EXPECT_LT(rel(b, yg, yc), 1e-2) << "ngram_embed";
  }
  // Decode's rows with everything on the device: the one-kernel embedding against the CPU and
  // against the backend's composition of gathers, GEMVs and scale (the same bf16 products).
  for (const dtype table_type : {dtype::bf16, dtype::f32})
    for (const std::int64_t t : {1, 3, 4}) {
      const std::int64_t h = 320, d = 80;  // 320 columns: more than one block; d % 8 == 0 (16-byte loads)
      const tensor base_c = b.cpu.upload(random({40, h}, 31), table_type);
      std::vector<tensor> tables_c, tables_g, proj_c, proj_g;
      for (int i = 0; i < 4; ++i) {
        const tensor table = random({30 + i, d}, 32 + i);
        tables_c.push_back(b.cpu.upload(table, table_type));
        tables_g.push_back(b.gpu.upload(table, table_type));
        const tensor p = random({h, d}, 50 + i, 0.3f);
        proj_c.push_back(b.cpu.upload(p, dtype::bf16));
        proj_g.push_back(b.gpu.upload(p, dtype::bf16));
      }
      tensor tokens = tensor::empty({t}, dtype::i64), ngram = tensor::empty({4, t}, dtype::i64);
      for (int r = 0; r < t; ++r) {
        tokens.data<std::int64_t>()[r] = (r * 11 + 3) % 40;
        for (int i = 0; i < 4; ++i) ngram.data<std::int64_t>()[i * t + r] = (r * 7 + i * 5 + 1) % 30;
      }
      const tensor base_g = b.gpu.upload(base_c, table_type), tokens_g = b.gpu.upload(tokens, dtype::i64),
                   ngram_g = b.gpu.upload(ngram, dtype::i64);
      tensor yc = tensor::empty({t, h}, dtype::f32), yg = poisoned(b.gpu, {t, h}), ycomposed = poisoned(b.gpu, {t, h});
      b.cpu.ngram_embed(base_c, tokens, ngram, tables_c, proj_c, yc);
      b.gpu.ngram_embed(base_g, tokens_g, ngram_g, tables_g, proj_g, yg);
      b.gpu.backend::ngram_embed(base_g, tokens_g, ngram_g, tables_g, proj_g, ycomposed);
      EXPECT_LT(rel(b, yg, yc), 1e-2) << "fused ngram_embed vs the CPU, " << t << " rows";
      const tensor composed = b.gpu.download(ycomposed);
      EXPECT_LT(rel(b, yg, composed), 1e-5) << "fused ngram_embed vs the composition, " << t << " rows";
    }
}

// Decode's embedding with its ids hashed in the same kernel from the device N-gram cache: over
// steps of 1-4 sequences (documents ended by EOS among them) the ids it publishes equal the host
// hasher's exactly, and its rows equal the backend's composition and the CPU's embedding of the
// host's ids. The grid has 80 blocks: a block that hashed against a context another block had
// already moved would publish, or embed, other ids at the next step.
TEST(cuda_backend, the_fused_ngram_embedding_hashes_on_the_device) {
  SKIP_WITHOUT_GPU();
  backends b;
  const model_config c = test::tiny_config(R"("hidden_size": 640)");
  const std::int64_t e = c.num_ngram_tables(), d = c.ngram_dim(), h = c.hidden_size;
  const tensor base_c = b.cpu.upload(random({c.vocab_size, h}, 70), dtype::bf16), base_g = b.gpu.upload(base_c, dtype::bf16);
  std::vector<tensor> tables_c, tables_g, proj_c, proj_g;
  for (std::int64_t i = 0; i < e; ++i) {
    const tensor table = random({c.ngram_table_rows(i), d}, 71 + static_cast<std::uint64_t>(i));
    tables_c.push_back(b.cpu.upload(table, dtype::bf16));
    tables_g.push_back(b.gpu.upload(table, dtype::bf16));
    const tensor p = random({h, d}, 80 + static_cast<std::uint64_t>(i), 0.1f);
    proj_c.push_back(b.cpu.upload(p, dtype::bf16));
    proj_g.push_back(b.gpu.upload(p, dtype::bf16));
  }
  const ngram_hasher hasher(c);
  std::vector<ngram_context> contexts(4);
  auto cache = b.gpu.make_device_ngram(c, 4);
  std::mt19937 g(5);
  for (int step = 0; step < 24; ++step) {
    const std::int64_t t = 1 + step % 4;
    tensor next = tensor::empty({t}, dtype::i32), rows = tensor::empty({t}, dtype::i64), want = tensor::empty({e, t}, dtype::i64);
    for (std::int64_t r = 0; r < t; ++r) {
      const std::int32_t token = step % 7 == 3 && r == 0 ? c.eos_token_id : static_cast<std::int32_t>(3 + g() % (c.vocab_size - 3));
      next.data<std::int32_t>()[r] = token;
      rows.data<std::int64_t>()[r] = token;
      std::vector<std::int64_t> ids(static_cast<std::size_t>(e));
      hasher.hash({&token, 1}, contexts[static_cast<std::size_t>(r)], ids.data());
      for (std::int64_t i = 0; i < e; ++i) want.data<std::int64_t>()[i * t + r] = ids[static_cast<std::size_t>(i)];
    }
    const tensor rows_g = b.gpu.upload(rows, dtype::i64);
    tensor ids_g = b.gpu.empty({e, t}, dtype::i64), yg = poisoned(b.gpu, {t, h}), ycomposed = poisoned(b.gpu, {t, h});
    b.gpu.ngram_embed_next(*cache, b.gpu.upload(next, dtype::i32), base_g, rows_g, ids_g, tables_g, proj_g, yg);
    const tensor got = b.gpu.download(ids_g);
    for (std::int64_t i = 0; i < e * t; ++i)
      ASSERT_EQ(got.data<std::int64_t>()[i], want.data<std::int64_t>()[i]) << "step " << step << ", id " << i;
    b.gpu.backend::ngram_embed(base_g, rows_g, b.gpu.upload(want, dtype::i64), tables_g, proj_g, ycomposed);
    EXPECT_LT(rel(b, yg, b.gpu.download(ycomposed)), 1e-5) << "fused vs the composition, step " << step;
    tensor yc = tensor::empty({t, h}, dtype::f32);
    b.cpu.ngram_embed(base_c, rows, want, tables_c, proj_c, yc);
    EXPECT_LT(rel(b, yg, yc), 1e-2) << "fused vs the CPU, step " << step;
  }
}

// RoPE (theta 10000) for `rope_dim` rotated columns with a YaRN attention factor, on both backends.
struct rope_tables {
  rope_table cpu, gpu;
};
rope_tables make_ropes(backends& b, std::int64_t rope_dim, float factor) {
  tensor freq = tensor::empty({rope_dim / 2}, dtype::f32);
  for (std::int64_t i = 0; i < rope_dim / 2; ++i)
    freq.data<float>()[i] = std::pow(10000.0f, -2.0f * static_cast<float>(i) / static_cast<float>(rope_dim));
  return {{freq, factor}, {b.gpu.upload(freq, dtype::f32), factor}};
}

// Sequences' paged latent caches on both backends, filled with random latent rows: shape[s] is
// {rows this step, first position} of sequence s; the step's rows interleave the sequences in
// `order`, one row of each in turn. blocks holds each cache block, CPU then GPU.
struct paged_caches {
  std::vector<tensor> blocks;
  tensor row_seq, positions;  // host
  paged_latents cpu, gpu;
  paged_caches(backends& b, const std::vector<std::array<std::int64_t, 2>>& shape, const std::vector<std::size_t>& order,
               std::int64_t block, std::int64_t width, std::int64_t max_blocks, std::int64_t max_keys,
               std::int64_t rows_per_sequence) {
    const auto n = static_cast<std::int64_t>(shape.size());
    tensor table_c = tensor::zeros({n, max_blocks}, dtype::i64), table_g = tensor::zeros({n, max_blocks}, dtype::i64);
    std::vector<std::int32_t> seqs;
    std::vector<std::int64_t> pos;
    std::int64_t most = 0;
    for (std::size_t s = 0; s < shape.size(); ++s) {
      const auto [rows, first] = shape[s];
      most = std::max(most, rows);
      for (std::int64_t k = 0, b_i = 0; k < first + rows; k += block, ++b_i) {
        const tensor lat = random({block, width}, 100 + s * 10 + static_cast<std::uint64_t>(k));
        blocks.push_back(lat), blocks.push_back(b.gpu.upload(lat, dtype::f32));
        table_c.data<std::int64_t>()[static_cast<std::int64_t>(s) * max_blocks + b_i] = reinterpret_cast<std::int64_t>(lat.raw());
        table_g.data<std::int64_t>()[static_cast<std::int64_t>(s) * max_blocks + b_i] =
            reinterpret_cast<std::int64_t>(blocks.back().raw());
      }
    }
    for (std::int64_t j = 0; j < most; ++j)
      for (std::size_t s : order)
        if (j < shape[s][0]) seqs.push_back(static_cast<std::int32_t>(s)), pos.push_back(shape[s][1] + j);
    const auto rows = static_cast<std::int64_t>(seqs.size());
    row_seq = tensor::empty({rows}, dtype::i32), positions = tensor::empty({rows}, dtype::i64);
    std::copy(seqs.begin(), seqs.end(), row_seq.data<std::int32_t>());
    std::copy(pos.begin(), pos.end(), positions.data<std::int64_t>());
    cpu = {table_c, row_seq, positions, block, max_keys, rows_per_sequence};
    gpu = {b.gpu.upload(table_g, dtype::i64), b.gpu.upload(row_seq, dtype::i32), b.gpu.upload(positions, dtype::i64), block,
           max_keys, rows_per_sequence};
  }
};

TEST(cuda_backend, latents_attention_and_router) {
  SKIP_WITHOUT_GPU();
  backends b;
  {
    // Three sequences: decode after 37 cached tokens, a 5-token prefill, 3 rows after 20; rows
    // interleaved across sequences. write_latents normalises, rotates and stores the new rows,
    // then attention (rotating q) reads all.
    const mla_dims d{4, 16, 8, 16, 32};
    const rope_tables ropes = make_ropes(b, d.rope_dim, 1.3f);
    const rope_table &rope_c = ropes.cpu, &rope_g = ropes.gpu;
    const tensor latent_w = random({d.kv_lora_rank}, 35);
    const std::int64_t block = 16, width = d.kv_lora_rank + d.rope_dim;
    // Rows interleaved: s1 r0, s2 r0, s0, s1 r1, ...; the GPU cache claims many rows per
    // sequence, so attention takes the prefill path on tensor cores.
    const paged_caches caches(b, {{1, 37}, {5, 0}, {3, 20}}, {1, 2, 0}, block, width, 4, 60, 16);
    const paged_latents &pc = caches.cpu, &pg = caches.gpu;
    const tensor &table_c = caches.cpu.block_table, &seq_t = caches.row_seq, &pos_t = caches.positions;
    const std::int64_t row = seq_t.numel(), max_keys = 60;
    const std::vector<tensor>& keep = caches.blocks;
    tensor kv = random({row, width}, 34), kv_g = b.gpu.upload(kv, dtype::f32);
    b.cpu.write_latents(kv, {latent_w, 1e-6f, 1.7f}, rope_c, pc);
    b.gpu.write_latents(kv_g, {b.gpu.upload(latent_w, dtype::f32), 1e-6f, 1.7f}, rope_g, pg);
    EXPECT_LT(rel(b, kv_g, kv), 1e-5) << "write_latents' prepared rows";
    for (std::size_t i = 0; i < keep.size(); i += 2) EXPECT_LT(rel(b, keep[i + 1], keep[i]), 1e-5) << "write_latents block " << i / 2;
    const tensor q = random({row, d.num_heads * (d.nope_dim + d.rope_dim)}, 32);
    const tensor kv_b = random({d.num_heads * (d.nope_dim + d.v_dim), d.kv_lora_rank}, 33, 0.2f);
    tensor yc = tensor::empty({row, d.num_heads * d.v_dim}, dtype::f32), yg = poisoned(b.gpu, {row, d.num_heads * d.v_dim});
    b.cpu.mla_attention(q, kv_b, pc, d, rope_c, 0.11f, yc);
    b.gpu.mla_attention(b.gpu.upload(q, dtype::f32), b.gpu.upload(kv_b, dtype::f32), pg, d, rope_g, 0.11f, yg);
    // Prefill runs un-absorbed with bf16 operands (q, keys, values, P) on tensor cores: bf16's tolerance.
    EXPECT_LT(rel(b, yg, yc), 1e-2) << "mla_attention, " << row << " rows (prefill)";
    tensor yd = poisoned(b.gpu, {row, d.num_heads * d.v_dim});
    paged_latents decode = pg;
    decode.rows_per_sequence = 5;  // the same rows through the decode kernel
    b.gpu.mla_attention(b.gpu.upload(q, dtype::f32), b.gpu.upload(kv_b, dtype::f32), decode, d, rope_g, 0.11f, yd);
    EXPECT_LT(rel(b, yd, yc), 1e-5) << "mla_attention, " << row << " rows (the decode kernel)";
    {  // kv_b in bf16, as the CUDA backend keeps it: against the CPU on the same rounded values
      const tensor kv_b16 = b.cpu.upload(kv_b, dtype::bf16).to_f32(), kv_b16g = b.gpu.upload(kv_b, dtype::bf16);
      tensor yc16 = tensor::empty({row, d.num_heads * d.v_dim}, dtype::f32);
      b.cpu.mla_attention(q, kv_b16, pc, d, rope_c, 0.11f, yc16);
      for (const auto& cache : {pg, decode}) {  // prefill, then the decode kernel
        tensor yg16 = poisoned(b.gpu, {row, d.num_heads * d.v_dim});
        b.gpu.mla_attention(b.gpu.upload(q, dtype::f32), kv_b16g, cache, d, rope_g, 0.11f, yg16);
        EXPECT_LT(rel(b, yg16, yc16), cache.rows_per_sequence >= 16 ? 1e-2 : 1e-5)
            << "mla_attention with bf16 kv_b, rows per sequence " << cache.rows_per_sequence;
      }
    }
    // The first six rows alone.
    const std::int64_t few = 6;
    const paged_latents pc6{table_c, seq_t.rows(0, few), pos_t.rows(0, few), block, max_keys, 2};
    const paged_latents pg6{pg.block_table, b.gpu.upload(seq_t.rows(0, few), dtype::i32),
                            b.gpu.upload(pos_t.rows(0, few), dtype::i64), block, max_keys, 2};
    tensor yc6 = tensor::empty({few, d.num_heads * d.v_dim}, dtype::f32), yg6 = poisoned(b.gpu, {few, d.num_heads * d.v_dim});
    b.cpu.mla_attention(q.rows(0, few), kv_b, pc6, d, rope_c, 0.11f, yc6);
    b.gpu.mla_attention(b.gpu.upload(q.rows(0, few), dtype::f32), b.gpu.upload(kv_b, dtype::f32), pg6, d, rope_g, 0.11f, yg6);
    EXPECT_LT(rel(b, yg6, yc6), 1e-5) << "mla_attention, " << few << " rows (the decode kernel)";
  }
  {
    const std::int64_t t = 50, e = 24;
    const int k = 4;
    const tensor logits = random({t, e}, 41, 2.0f), bias = random({e}, 42, 0.05f);
    tensor ic = tensor::empty({t, k}, dtype::i32), wc = tensor::empty({t, k}, dtype::f32);
    tensor ig = b.gpu.empty({t, k}, dtype::i32), wg = poisoned(b.gpu, {t, k});
    b.cpu.router_topk(logits, bias, k, 2.5f, ic, wc);
    b.gpu.router_topk(b.gpu.upload(logits, dtype::f32), b.gpu.upload(bias, dtype::f32), k, 2.5f, ig, wg);
    const tensor ih = b.gpu.download(ig);
    for (std::int64_t i = 0; i < t * k; ++i) ASSERT_EQ(ih.data<std::int32_t>()[i], ic.data<std::int32_t>()[i]) << "entry " << i;
    EXPECT_LT(rel(b, wg, wc), 1e-6) << "router weights";
  }
}

// The flash prefill kernel with the Lite model's head widths (192 query/key and 128 value
// columns): three sequences, two continuing after cached tokens, their rows ending mid-tile and
// their keys in several 64-key tiles, against the CPU (bf16 operands: < 1e-2).
TEST(cuda_backend, flash_prefill_attention_over_many_key_tiles) {
  SKIP_WITHOUT_GPU();
  backends b;
  const mla_dims d{3, 128, 64, 128, 96};
  const rope_tables ropes = make_ropes(b, d.rope_dim, 1.0f);
  const paged_caches caches(b, {{150, 40}, {70, 0}, {20, 200}}, {0, 1, 2}, 16, d.kv_lora_rank + d.rope_dim, 14, 220, 20);
  const std::int64_t rows = caches.row_seq.numel(), cols = d.num_heads * d.v_dim;
  const tensor q = random({rows, d.num_heads * (d.nope_dim + d.rope_dim)}, 81);
  const tensor kv_b = random({d.num_heads * (d.nope_dim + d.v_dim), d.kv_lora_rank}, 82, 0.1f);
  tensor yc = tensor::empty({rows, cols}, dtype::f32), yg = poisoned(b.gpu, {rows, cols});
  b.cpu.mla_attention(q, kv_b, caches.cpu, d, ropes.cpu, 0.07f, yc);
  b.gpu.mla_attention(b.gpu.upload(q, dtype::f32), b.gpu.upload(kv_b, dtype::f32), caches.gpu, d, ropes.gpu, 0.07f, yg);
  EXPECT_LT(rel(b, yg, yc), 1e-2) << "flash prefill, " << rows << " rows";
}

TEST(cuda_backend, routed_moe_on_the_device) {
  SKIP_WITHOUT_GPU();
  backends b;
  const std::int64_t h = 64, f = 40, n_routed = 5;
  const int k = 4;
  std::vector<tensor> gu_c, down_c, gu_g, down_g;
  for (int e = 0; e < n_routed; ++e) {
    const tensor gu = random({2 * f, h}, 50 + e, 0.2f), d = random({h, f}, 60 + e, 0.2f);
    gu_c.push_back(b.cpu.upload(gu, dtype::bf16));
    down_c.push_back(b.cpu.upload(d, dtype::bf16));
    gu_g.push_back(b.gpu.upload(gu, dtype::bf16));
    down_g.push_back(b.gpu.upload(d, dtype::bf16));
  }
  // 1, 2, 3 and 4 rows (decode, verification: each width of the grouped GEMV, float32
  // activations), then 8, 12 and 64 (batched decode: the experts on tensor cores, their slots padded
  // to the row count, bf16 activations as in linear()'s cuBLAS path), routed on the device from
  // a float32 router over 5 routed and 3 zero experts; then the same added into an output that
  // holds values.
  const tensor router = random({8, h}, 72, 0.5f), bias = random({8}, 73, 0.05f);
  const moe_layer layer_c{router, bias, k, 2.5f, gu_c, down_c};
  const moe_layer layer_g{b.gpu.upload(router, dtype::f32), b.gpu.upload(bias, dtype::f32), k, 2.5f, gu_g, down_g};
  for (const std::int64_t t : {std::int64_t{1}, std::int64_t{2}, std::int64_t{3}, std::int64_t{4}, std::int64_t{8}, std::int64_t{12}, std::int64_t{64}})
    for (const auto mode : {write_mode::overwrite, write_mode::accumulate}) {
      const tensor u = random({t, h}, 70 + t), y0 = random({t, h}, 74 + t);
      tensor yc = b.cpu.upload(y0, dtype::f32);
      tensor yg = mode == write_mode::overwrite ? poisoned(b.gpu, {t, h}) : b.gpu.upload(y0, dtype::f32);
      b.cpu.routed_moe(u, layer_c, yc, mode);
      b.gpu.routed_moe(b.gpu.upload(u, dtype::f32), layer_g, yg, mode);
      EXPECT_LT(rel(b, yg, yc), t > 4 ? 1e-2 : 1e-5) << "routed_moe, " << t << " rows" << (mode == write_mode::accumulate ? ", added" : "");
    }
}

// Device sampling against the host rule (sample_token) on the same logits and uniforms: ids
// exactly. Rows of random logits and rows with few distinct values (ties at every cut), odd and
// real-sized vocabularies, every rule alone and combined, contexts for the penalty.
TEST(cuda_backend, sampling_on_the_device_picks_the_host_rules_token) {
  SKIP_WITHOUT_GPU();
  backends b;
  const std::vector<sampling_params> rules = {
      {.temperature = 0.0f},
      {.temperature = 0.0f, .repetition_penalty = 1.3f},
      {.temperature = 1.0f},
      {.temperature = 0.7f, .top_k = 1},
      {.temperature = 0.7f, .top_k = 5},
      {.temperature = 1.2f, .top_k = 50},
      {.temperature = 1.0f, .top_p = 0.5f},
      {.temperature = 0.8f, .top_p = 0.9f},
      {.temperature = 0.8f, .top_k = 40, .top_p = 0.7f},
      {.temperature = 1.0f, .top_k = 20, .top_p = 0.95f, .repetition_penalty = 1.5f},
      {.temperature = 0.6f, .repetition_penalty = 0.8f},
  };
  for (const std::int64_t vocab : {1000, 32768})
    for (const bool ties : {false, true}) {
      const std::int64_t rows = 16;
      tensor logits = random({rows, vocab}, 7 + vocab + ties, 3.0f);
      if (ties)  // eight levels: every top-k and top-p cut falls inside a run of equal logits
        for (std::int64_t i = 0; i < logits.numel(); ++i)
          logits.data<float>()[i] = std::round(std::clamp(logits.data<float>()[i], -4.0f, 4.0f));
      rng g(11 + vocab);
      std::vector<std::vector<std::int32_t>> contexts(rules.size() * rows);
      std::vector<token_draw> draws;
      for (std::size_t r = 0; r < rules.size(); ++r)
        for (std::int64_t row = 0; row < rows; ++row) {
          auto& context = contexts[r * rows + static_cast<std::size_t>(row)];
          for (int c = 0; c < 40; ++c) context.push_back(static_cast<std::int32_t>(g.next() % vocab));
          draws.push_back({.row = row, .params = rules[r], .u = g.uniform(), .context = context});
        }
      tensor picked = b.gpu.empty({static_cast<std::int64_t>(draws.size())}, dtype::i32);
      b.gpu.sample(b.gpu.upload(logits, dtype::f32), draws, picked);
      const tensor got = b.gpu.download(picked);
      for (std::size_t d = 0; d < draws.size(); ++d) {
        const float* row = logits.data<float>() + draws[d].row * vocab;
        EXPECT_EQ(got.data<std::int32_t>()[d], sample_token({row, static_cast<std::size_t>(vocab)}, draws[d]))
            << "vocab " << vocab << (ties ? " tied" : "") << " rule " << d / rows << " row " << draws[d].row;
      }
    }
  // backend::argmax (greedy's pick inside recordings) against the host's, i32 and i64 ids.
  for (const bool ties : {false, true}) {
    tensor logits = random({9, 32768}, 21 + ties, 3.0f);
    if (ties)
      for (std::int64_t i = 0; i < logits.numel(); ++i) logits.data<float>()[i] = std::round(std::clamp(logits.data<float>()[i], -4.0f, 4.0f));
    const tensor on_gpu = b.gpu.upload(logits, dtype::f32);
    for (const dtype type : {dtype::i32, dtype::i64}) {
      tensor ids = b.gpu.empty({9}, type);
      b.gpu.argmax(on_gpu, ids);
      const tensor got = b.gpu.download(ids);
      for (std::int64_t r = 0; r < 9; ++r) {
        const auto id = type == dtype::i32 ? got.data<std::int32_t>()[r] : got.data<std::int64_t>()[r];
        EXPECT_EQ(id, argmax({logits.data<float>() + r * 32768, 32768})) << "row " << r << (ties ? " tied" : "");
      }
    }
  }
  // A draw beyond the logits' rows is refused before anything runs.
  const tensor logits = b.gpu.upload(random({2, 64}, 5), dtype::f32);
  tensor picked = b.gpu.empty({1}, dtype::i32);
  const std::vector<token_draw> beyond = {{.row = 2, .params = {.temperature = 0.0f}}};
  EXPECT_THROW(b.gpu.sample(logits, beyond, picked), std::invalid_argument);
}

TEST(cuda_backend, the_whole_model_matches_the_cpu) {
  SKIP_WITHOUT_GPU();
  backends b;
  const auto dir = test::make_model("cuda_model", test::tiny_config(R"("num_layers": 3)"), 5);
  auto cpu = model::load(dir, b.cpu);
  auto gpu = model::load(dir, b.gpu);
  // A batched prefill of two sequences, then decode steps.
  sequence_state sc[2], sg[2];
  std::vector<std::vector<std::int32_t>> feed{{5, 9, 14, 2, 33, 7, 61, 8, 19}, {40, 3, 11, 27, 6}};
  for (int step = 0; step < 6; ++step) {
    std::vector<step_input> in_c, in_g;
    for (int i = 0; i < 2; ++i) {
      in_c.push_back({&sc[i], feed[static_cast<std::size_t>(i)]});
      in_g.push_back({&sg[i], feed[static_cast<std::size_t>(i)]});
    }
    const tensor lc = cpu->forward(in_c, logits_mode::last_token);
    const tensor lg = gpu->forward(in_g, logits_mode::last_token);
    const double e = test::relative_l2(lg.data<float>(), lc.data<float>(), static_cast<std::size_t>(lc.numel()));
    EXPECT_LT(e, 2e-2) << "step " << step;
    for (int i = 0; i < 2; ++i) {
      const float* row = lc.data<float>() + i * lc.dim(1);
      feed[static_cast<std::size_t>(i)].assign(1, argmax({row, static_cast<std::size_t>(lc.dim(1))}));
    }
  }
  // A 300-token prefill: attention on tensor cores over many cache blocks. Its queries, keys,
  // values and softmax weights are bf16 too (as in transformers run in bf16, whose logits are
  // 2.8e-2 to 3.8e-2 from float64 in check.sh), so its bound is looser than the decode steps'.
  {
    sequence_state lc_s, lg_s;
    std::vector<std::int32_t> prompt;
    for (int i = 0; i < 300; ++i) prompt.push_back(3 + (i * 37) % 90);
    step_input ic{&lc_s, prompt}, ig{&lg_s, prompt};
    const tensor lc = cpu->forward({&ic, 1}, logits_mode::all_tokens), lg = gpu->forward({&ig, 1}, logits_mode::all_tokens);
    EXPECT_LT(test::relative_l2(lg.data<float>(), lc.data<float>(), static_cast<std::size_t>(lc.numel())), 3e-2)
        << "300-token prefill";
  }
  // Greedy generation: the same tokens while the CPU's top-2 gap is clear of bf16 noise.
  const tokenizer tok = tokenizer::load(std::string(TROUPE_SOURCE_DIR) + "/configs/tokenizers/troupe-bpe-4k.json");
  generation_params p;
  p.sampling.temperature = 0;
  p.max_tokens = 48;
  p.stop_on_eos = false;
  const std::vector<std::int32_t> prompt{5, 9, 14, 2, 33};
  const auto a = generate(*cpu, tok, prompt, p), g = generate(*gpu, tok, prompt, p);
  std::size_t same = 0;
  while (same < a.ids.size() && same < g.ids.size() && a.ids[same] == g.ids[same]) ++same;
  std::cerr << "  greedy: " << same << " of " << a.ids.size() << " tokens identical\n";
  EXPECT_GE(same, 32u);
}

// Decode steps replayed from CUDA graphs against the same steps dispatched op by op: batches
// that shrink and grow (a new graph per row count, block tables rewritten), positions crossing
// KV block boundaries, all-token logits of multi-row (speculative-verification) steps. With the
// tables on the device the embedding is recorded too: the device N-gram cache hashes (slots
// re-seeded as sequences come and go, an EOS resetting a segment) against the host's hashing.
// Twelve sequences decoding together: past the GEMV's 4 rows (and 8) the step (its MoE on tensor cores
// included) is still one recording, equal to the same steps op by op.
TEST(cuda_backend, recorded_batched_decode_beyond_eight_rows) {
  SKIP_WITHOUT_GPU();
  cuda_backend gpu;
  const auto dir = test::make_model("cuda_recorded_wide", test::tiny_config(R"("num_layers": 2)"), 8);
  auto recorded = model::load(dir, gpu, table_placement::device);
  auto plain = model::load(dir, gpu, table_placement::device);
  plain->set_recorded_steps(false);
  const std::size_t n = 12;
  std::vector<sequence_state> sr(n), sp(n);
  std::vector<std::vector<std::int32_t>> feed(n);
  for (std::size_t i = 0; i < n; ++i) feed[i] = {static_cast<std::int32_t>(3 + i), static_cast<std::int32_t>(20 + 3 * i), 9};
  for (int step = 0; step < 6; ++step) {  // step 0 prefills op by op; steps 1-5 replay a 12-row recording
    std::vector<step_input> in_r, in_p;
    for (std::size_t i = 0; i < n; ++i) in_r.push_back({&sr[i], feed[i]}), in_p.push_back({&sp[i], feed[i]});
    const tensor lr = recorded->forward(in_r, logits_mode::last_token), lp = plain->forward(in_p, logits_mode::last_token);
    ASSERT_EQ(lr.numel(), lp.numel());
    EXPECT_LT(test::relative_l2(lr.data<float>(), lp.data<float>(), static_cast<std::size_t>(lp.numel())), 1e-6) << "step " << step;
    for (std::size_t i = 0; i < n; ++i)
      feed[i].assign(1, argmax({lp.data<float>() + static_cast<std::int64_t>(i) * lp.dim(1), static_cast<std::size_t>(lp.dim(1))}));
  }
}

TEST(cuda_backend, recorded_steps_equal_op_by_op_steps) {
  SKIP_WITHOUT_GPU();
  cuda_backend gpu;
  const auto dir = test::make_model("cuda_recorded", test::tiny_config(R"("num_layers": 2)"), 6);
  for (const auto placement : {table_placement::host, table_placement::device}) {
    auto recorded = model::load(dir, gpu, placement);
    auto plain = model::load(dir, gpu, placement);
    plain->set_recorded_steps(false);
    const std::int32_t eos = plain->config().eos_token_id;
    std::vector<sequence_state> sr(4), sp(4);
    std::vector<std::vector<std::int32_t>> feed{
        {5, 9, 14, 2, 33, 7, 61, 8, 19}, {40, 3, 11}, {7, 7, 8, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14}, {}};
    // Sequence 3 arrives with 250 tokens: its decode steps outgrow the recorded block tables
    // (room for 256 keys at first) and the step is recorded again with room for 512.
    for (int i = 0; i < 250; ++i) feed[3].push_back(3 + (i * 31) % 90);
    double worst = 0;
    for (int step = 0; step < 40; ++step) {
      // Sequences 0-2 from the start; 1 leaves after step 12; 3 joins at step 20 (a 250-token prompt).
      std::vector<std::size_t> live;
      for (std::size_t i : {0u, 1u, 2u, 3u})
        if ((i != 1 || step <= 12) && (i != 3 || step >= 20)) live.push_back(i);
      // Step 30 verifies three tokens of sequence 0 at once (all-token logits).
      const bool multi = step == 30;
      if (multi) feed[0] = {feed[0][0], 17, 18};
      if (step == 25) feed[2] = {eos};  // a new segment: the N-gram cache empties
      std::vector<step_input> in_r, in_p;
      for (auto i : live) in_r.push_back({&sr[i], feed[i]}), in_p.push_back({&sp[i], feed[i]});
      const auto mode = multi ? logits_mode::all_tokens : logits_mode::last_token;
      const tensor lr = recorded->forward(in_r, mode), lp = plain->forward(in_p, mode);
      ASSERT_EQ(lr.numel(), lp.numel());
      const double e = test::relative_l2(lr.data<float>(), lp.data<float>(), static_cast<std::size_t>(lp.numel()));
      worst = std::max(worst, e);
      EXPECT_LT(e, 1e-6) << "step " << step << ", tables in " << (placement == table_placement::host ? "host" : "device")
                         << " memory";
      for (auto i : live) EXPECT_EQ(sr[i].ngram, sp[i].ngram) << "host N-gram cache of sequence " << i;
      const auto vocab = static_cast<std::size_t>(lp.dim(1));
      for (std::size_t j = 0; j < live.size(); ++j) {
        const auto row = multi ? static_cast<std::int64_t>(lp.dim(0)) - static_cast<std::int64_t>(live.size()) +
                                     static_cast<std::int64_t>(j)
                               : static_cast<std::int64_t>(j);
        feed[live[j]].assign(1, argmax({lp.data<float>() + row * lp.dim(1), vocab}));
      }
    }
    std::cerr << "  recorded vs op by op, tables in " << (placement == table_placement::host ? "host" : "device")
              << " memory: worst relative L2 " << worst << "\n";
  }
}

// Greedy decoding's ids picked on the device (forward_argmax: only ids come back) against the
// argmax of the same steps' downloaded logits, for decode steps (the device N-gram cache hashes)
// and verification steps (several tokens per sequence: the host hashes, the embedding is still
// recorded), with the tables on the device and in host memory, n-gram and plain embeddings.
TEST(cuda_backend, argmax_on_the_device_equals_the_argmax_of_the_logits) {
  SKIP_WITHOUT_GPU();
  cuda_backend gpu;
  for (const bool ngram : {true, false}) {
    const auto dir = test::make_model("cuda_argmax", test::tiny_config(R"("num_layers": 2)", ngram), 5);
    for (const auto placement : {table_placement::device, table_placement::host}) {
      auto m = model::load(dir, gpu, placement);
      std::vector<sequence_state> by_logits(3), by_ids(3);
      std::vector<std::vector<std::int32_t>> feed{{5, 9, 14, 2, 33}, {40, 3}, {7, 8, 1, 2, 3, 4}};
      for (int step = 0; step < 12; ++step) {
        const bool verify = step % 4 == 3;  // every fourth step scores four tokens of each sequence
        if (verify)
          for (auto& f : feed) f = {f[0], 11, 12, 13};
        std::vector<step_input> a, b;
        for (std::size_t i = 0; i < feed.size(); ++i) a.push_back({&by_logits[i], feed[i]}), b.push_back({&by_ids[i], feed[i]});
        const auto mode = verify ? logits_mode::all_tokens : logits_mode::last_token;
        const tensor logits = m->forward(a, mode);
        const auto ids = m->forward_argmax(b, mode);
        ASSERT_EQ(static_cast<std::int64_t>(ids.size()), logits.dim(0));
        const auto vocab = static_cast<std::size_t>(logits.dim(1));
        for (std::int64_t r = 0; r < logits.dim(0); ++r) {
          const float* row = logits.data<float>() + r * logits.dim(1);
          const auto id = ids[static_cast<std::size_t>(r)], host = argmax({row, vocab});
          // The two runs are separate replays of one recording: equal ids, or an exact tie.
          EXPECT_TRUE(id == host || row[id] == row[host]) << "step " << step << " row " << r << ": " << id << " vs " << host;
        }
        for (std::size_t i = 0; i < feed.size(); ++i) {
          EXPECT_EQ(by_logits[i].ngram, by_ids[i].ngram);
          feed[i].assign(1, ids[verify ? 4 * i + 3 : i]);
        }
      }
    }
  }
}

// Greedy drafting in one replay (draft_greedy: every later step fed the pick before it on the
// device) against the same steps one at a time (each a replay of its own), over rounds that
// roll the caches back as verification does, for n-gram (device-hashed later steps) and plain
// embeddings. Each first step has at most four rows, so both runs score on the same GEMV path
// and the ids must be equal. Sequence 1 starts with 250 tokens: its later rounds outgrow the
// recorded block tables (256 keys) and record the chain again.
TEST(cuda_backend, chained_draft_steps_equal_steps_one_at_a_time) {
  SKIP_WITHOUT_GPU();
  cuda_backend gpu;
  for (const bool ngram : {true, false}) {
    const auto dir = test::make_model("cuda_chain", test::tiny_config(R"("num_layers": 2)", ngram), 7);
    auto chain = model::load(dir, gpu, table_placement::device);
    auto single = model::load(dir, gpu, table_placement::device);
    std::vector<sequence_state> sc(2), ss(2);
    std::vector<std::vector<std::int32_t>> history(2), feed{{5, 9, 14, 2, 33}, {}};
    for (int i = 0; i < 250; ++i) feed[1].push_back(3 + (i * 37) % 90);
    for (int round = 0; round < 16; ++round) {
      const std::int64_t steps = 2 + round % 6;
      std::vector<step_input> a, b;
      for (std::size_t i = 0; i < 2; ++i) a.push_back({&sc[i], feed[i]}), b.push_back({&ss[i], feed[i]});
      const auto picks = chain->draft_greedy(a, steps);
      std::vector<std::vector<std::int32_t>> expect(2);
      for (std::int64_t j = 0; j < steps; ++j) {
        const auto one = single->draft_greedy(b, 1);
        for (std::size_t i = 0; i < 2; ++i) {
          expect[i].push_back(one[i][0]);
          b[i].tokens = std::span(expect[i]).last(1);
        }
      }
      for (std::size_t i = 0; i < 2; ++i) {
        ASSERT_EQ(picks[i], expect[i]) << (ngram ? "n-gram" : "plain") << " round " << round << " sequence " << i;
        EXPECT_EQ(sc[i].num_tokens, ss[i].num_tokens);
        EXPECT_EQ(sc[i].ngram, ss[i].ngram);
        history[i].insert(history[i].end(), feed[i].begin(), feed[i].end());
        history[i].insert(history[i].end(), picks[i].begin(), picks[i].end() - 1);
        // Verification keeps some drafts: roll back up to two of them, as a rejection would.
        const auto back = static_cast<std::size_t>((round + static_cast<int>(i)) % 3);
        history[i].resize(history[i].size() - std::min(back, static_cast<std::size_t>(steps - 1)));
        const auto kept = static_cast<std::int64_t>(history[i].size());
        roll_back(sc[i], kept, chain->ngram_after(history[i]));
        roll_back(ss[i], kept, single->ngram_after(history[i]));
        feed[i] = i == 0 ? std::vector<std::int32_t>{picks[i].back(), static_cast<std::int32_t>(10 + round)}
                         : std::vector<std::int32_t>{picks[i].back()};
      }
    }
  }
}

}  // namespace
}  // namespace troupe
