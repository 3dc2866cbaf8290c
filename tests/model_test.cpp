// The forward pass: step-by-step decoding against one prefill, batching against single
// sequences, each config variant, and bad input. The float64-independent check against
// PyTorch lives in tests/reference (ctest label "reference").
#include <gtest/gtest.h>

#include <fstream>

#include "gpu/cpu/cpu_backend.hpp"
#include "model/latent_cache.hpp"
#include "model/model.hpp"
#include "protocol/errors.hpp"
#include "tests/test_support.hpp"

namespace troupe {
namespace {

std::vector<std::int32_t> document_tokens(int n, int vocab, int eos, int seed) {
  std::vector<std::int32_t> t;
  for (int i = 0; i < n; ++i) t.push_back((i * 31 + seed * 17 + 5) % vocab);
  for (auto& x : t)
    if (x == eos) x = 3;
  if (n > 12) t[static_cast<std::size_t>(n / 3)] = eos;  // a document boundary inside
  return t;
}

tensor run(model& m, const std::vector<std::int32_t>& tokens, std::size_t step) {
  sequence_state s;
  tensor all = tensor::empty({static_cast<std::int64_t>(tokens.size()), m.config().vocab_size}, dtype::f32);
  for (std::size_t b = 0; b < tokens.size(); b += step) {
    const auto n = std::min(step, tokens.size() - b);
    const step_input in{&s, std::span<const std::int32_t>(tokens).subspan(b, n)};
    const tensor part = m.forward({&in, 1}, logits_mode::all_tokens);
    m.compute().copy_rows(part, all, static_cast<std::int64_t>(b));
  }
  return all;
}

// forward() adds each block's MoE term as the actor graph's stages do: the term on its own
// (moe(u)), then added to the block without it (c + MLP_1(v)); forward folds the add into the
// next block's first norm and runs the MoE as a side branch. The pieces the graph's actors call,
// in the graph's order, give the same logits bitwise.
TEST(model, forward_sums_the_moe_term_as_the_graphs_stages_do) {
  cpu_backend be(1);
  const auto dir = test::make_model("moe_term_sum", test::tiny_config(R"("num_layers": 3)"), 4);
  auto m = model::load(dir, be, table_placement::host);
  const std::vector<std::int32_t> tokens{5, 9, 14, 33, 7, 61, 8};
  const auto t = static_cast<std::int64_t>(tokens.size());

  sequence_state state;
  const step_input in{&state, tokens};
  const tensor library = m->forward({&in, 1}, logits_mode::all_tokens);

  const std::vector<std::int64_t> rows{t}, first{0};
  const step_layout layout = step_layout::make(rows, first);
  tensor ids = tensor::empty({t}, dtype::i32);
  std::copy(tokens.begin(), tokens.end(), ids.data<std::int32_t>());
  ngram_context context;
  ngram_context* contexts[] = {&context};
  tensor h = m->embed(ids, layout, contexts);
  const auto& c = m->config();
  latent_block_allocator blocks(be, default_kv_block_tokens, c.kv_lora_rank + c.qk_rope_head_dim);
  std::vector<latent_cache> caches(static_cast<std::size_t>(c.num_attention_layers()));
  for (std::int64_t l = 0; l < c.num_layers; ++l) {
    latent_cache* front_cache[] = {&caches[static_cast<std::size_t>(2 * l)]};
    latent_cache* back_cache[] = {&caches[static_cast<std::size_t>(2 * l + 1)]};
    const block_front front = m->block_front_half(l, h, layout, front_cache, blocks);
    tensor out = m->block_back_half(l, front, layout, back_cache, blocks);
    be.add(out, m->moe(l, front.u));
    h = out;
  }
  const tensor pieces = m->head(h);
  ASSERT_EQ(library.numel(), pieces.numel());
  for (std::int64_t i = 0; i < library.numel(); ++i)
    ASSERT_EQ(library.data<float>()[i], pieces.data<float>()[i]) << "logit " << i;
}

class model_variants : public ::testing::TestWithParam<std::pair<const char*, std::string>> {};

// Decoding token by token must reproduce one full prefill. Both run the same float32 kernels
// but with different GEMM shapes (gemv vs gemm) and attention lengths, so rounding differs in
// the last bits; 1e-5 relative L2 is ~100x the observed gap and ~1e4x below what any
// position, cache or hash error produces (those change logits at the 1e-1 level).
TEST_P(model_variants, decode_matches_prefill) {
  const auto& [name, overrides] = GetParam();
  const bool ngram = std::string(name) != "plain";
  const auto cfg = test::tiny_config(overrides, ngram);
  const auto dir = test::make_model(std::string("variant_") + name, cfg, 7);
  cpu_backend be(1);
  auto m = model::load(dir, be);
  const auto tokens = document_tokens(40, static_cast<int>(cfg.vocab_size), cfg.eos_token_id, 1);
  const tensor full = run(*m, tokens, tokens.size());
  for (std::size_t step : {1u, 5u}) {
    const tensor inc = run(*m, tokens, step);
    EXPECT_LT(test::relative_l2(inc.data<float>(), full.data<float>(), static_cast<std::size_t>(full.numel())), 1e-5)
        << name << " step " << step;
  }
}

INSTANTIATE_TEST_SUITE_P(
    configs, model_variants,
    ::testing::Values(std::make_pair("ngram", std::string()), std::make_pair("plain", std::string()),
                      std::make_pair("yarn", std::string(R"("rope_scaling": {"rope_type": "yarn", "factor": 4,
                          "original_max_position_embeddings": 16, "mscale": 1, "mscale_all_dim": 1}, "rope_theta": 500)")),
                      std::make_pair("no_q_lora", std::string(R"("q_lora_rank": null, "mla_scale_kv_lora": false)")),
                      std::make_pair("no_zero_experts", std::string(R"("zero_expert_num": 0)"))),
    [](const auto& info) { return std::string(info.param.first); });

TEST(model, batch_of_sequences_matches_each_alone) {
  const auto cfg = test::tiny_config();
  const auto dir = test::make_model("batch", cfg, 3);
  cpu_backend be(1);
  auto m = model::load(dir, be);
  std::vector<std::vector<std::int32_t>> prompts;
  for (int i = 0; i < 4; ++i) prompts.push_back(document_tokens(5 + 7 * i, 97, cfg.eos_token_id, i));
  // Alone: prefill then two decode steps of fixed tokens.
  std::vector<tensor> alone;
  for (const auto& p : prompts) {
    auto seq = p;
    seq.push_back(11);
    seq.push_back(12);
    alone.push_back(run(*m, seq, seq.size()));
  }
  // Together: one batched prefill of different lengths, then batched decode steps.
  std::vector<sequence_state> states(prompts.size());
  std::vector<step_input> batch;
  for (std::size_t i = 0; i < prompts.size(); ++i) batch.push_back({&states[i], prompts[i]});
  const tensor prefill = m->forward(batch, logits_mode::last_token);
  for (std::size_t i = 0; i < prompts.size(); ++i) {
    const auto last = static_cast<std::int64_t>(prompts[i].size()) - 1;
    EXPECT_LT(test::relative_l2(prefill.data<float>() + i * 97, alone[i].data<float>() + last * 97, 97), 1e-5);
  }
  for (std::int32_t tok : {11, 12}) {
    const std::vector<std::int32_t> one = {tok};
    batch.clear();
    for (auto& s : states) batch.push_back({&s, one});
    const tensor step = m->forward(batch, logits_mode::last_token);
    for (std::size_t i = 0; i < prompts.size(); ++i) {
      const auto row = static_cast<std::int64_t>(prompts[i].size()) + (tok - 11);
      EXPECT_LT(test::relative_l2(step.data<float>() + i * 97, alone[i].data<float>() + row * 97, 97), 1e-5);
    }
  }
}

TEST(model, tables_in_backend_memory_give_the_same_logits) {
  // Placement moves the embedding and n-gram tables, never what they hold: logits bitwise equal,
  // tied embeddings included.
  for (const bool tied : {false, true}) {
    const auto cfg = test::tiny_config(tied ? R"("tie_word_embeddings": true)" : "");
    const auto dir = test::make_model(tied ? "placement_tied" : "placement", cfg, 8);
    cpu_backend be(1);
    auto host = model::load(dir, be, table_placement::host);
    auto device = model::load(dir, be, parse_table_placement("device"));
    const auto tokens = document_tokens(20, static_cast<int>(cfg.vocab_size), cfg.eos_token_id, 2);
    const tensor a = run(*host, tokens, 7), b = run(*device, tokens, 7);
    EXPECT_EQ(test::relative_l2(a.data<float>(), b.data<float>(), static_cast<std::size_t>(a.numel())), 0.0) << tied;
  }
  EXPECT_THROW(parse_table_placement("gpu"), input_error);
}

TEST(model, n_gram_embedding_changes_the_output) {
  // Same weights for everything but the context: a token's logits must depend on the previous
  // token even with one layer's attention removed from the picture, through the n-gram tables.
  const auto cfg = test::tiny_config();
  const auto dir = test::make_model("ngram_effect", cfg, 5);
  cpu_backend be(1);
  auto m = model::load(dir, be);
  const auto a = m->ngram_ids(std::vector<std::int32_t>{10, 20}, {});
  const auto b = m->ngram_ids(std::vector<std::int32_t>{11, 20}, {});
  EXPECT_NE(a[4], b[4]);  // bigram of the second token differs
  EXPECT_EQ(a.size(), 8u);
}

TEST(model, bad_input_is_refused_with_a_clear_error) {
  const auto cfg = test::tiny_config(R"("max_position_embeddings": 8)");
  const auto dir = test::make_model("bad_input", cfg, 2);
  cpu_backend be(1);
  auto m = model::load(dir, be);
  sequence_state s;
  const std::vector<std::int32_t> bad = {5, 97};
  const step_input in{&s, bad};
  EXPECT_THROW(m->forward({&in, 1}, logits_mode::last_token), input_error);
  const std::vector<std::int32_t> long_seq(9, 4);
  sequence_state s2;
  const step_input in2{&s2, long_seq};
  try {
    m->forward({&in2, 1}, logits_mode::last_token);
    FAIL() << "expected an error";
  } catch (const input_error& e) {
    EXPECT_NE(std::string(e.what()).find("max_position_embeddings"), std::string::npos);
  }
}

TEST(model, checkpoint_of_another_shape_names_the_tensor) {
  const auto cfg = test::tiny_config();
  const auto dir = test::make_model("wrong_shape", cfg, 2);
  // Load the checkpoint with a config whose ffn size differs.
  const auto other = test::tiny_config(R"("ffn_hidden_size": 44)");
  std::ofstream(dir / "config.json") << model_config_to_json(other);
  cpu_backend be(1);
  try {
    model::load(dir, be);
    FAIL() << "expected an error";
  } catch (const input_error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("model.layers.0.mlps.0.gate_proj.weight"), std::string::npos) << msg;
    EXPECT_NE(msg.find("expected [44, 48]"), std::string::npos) << msg;
  }
}

}  // namespace
}  // namespace troupe

namespace troupe {

TEST(latent_cache, blocks_are_bounded_and_reused) {
  cpu_backend be(1);
  latent_block_allocator pool(be, 4, 3, 2);
  std::vector<tensor> blocks = {pool.allocate(), pool.allocate()};
  EXPECT_EQ(pool.blocks_in_use(), 2);
  EXPECT_THROW(pool.allocate(), input_error);  // the budget is a number of blocks
  const void* last = blocks[1].raw();
  pool.release(blocks);
  EXPECT_TRUE(blocks.empty());
  EXPECT_EQ(pool.blocks_in_use(), 0);
  const tensor again = pool.allocate();
  EXPECT_EQ(again.raw(), last);  // reused from the free list, not a new allocation
  EXPECT_EQ(again.shape(), (shape_t{4, 3}));
}

}  // namespace troupe
