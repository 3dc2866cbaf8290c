// Speculative decoding inside the actor graph: the draft actor drafts, the head verifies, and
// continuous batching mixes sequences with different draft lengths. Greedy output must be the
// plain forward pass's token for token (EOS-separated documents in the prompts exercise the
// N-gram cache's rewind), sampling must keep the target's distribution, drafts swapped while
// requests stream must change nothing, and the acceptance figures must add up.
#include <gtest/gtest.h>

#include <caf/scoped_actor.hpp>

#include <cmath>
#include <thread>

#include "gpu/cpu/cpu_backend.hpp"
#include "graph/topology.hpp"
#include "model/generator.hpp"
#include "protocol/errors.hpp"
#include "tests/graph_support.hpp"
#include "tests/test_support.hpp"
#include "tokenizer/tokenizer.hpp"

namespace troupe {

using namespace test;

namespace {

// Drafts as model directories: a weak one (a small plain model of the same vocabulary: almost
// every draft rejected), a close one (the target's weights in float32 where the target has
// them rounded to bf16: most accepted, some not) and a perfect one (the target's own weights).
std::string weak_draft() { return make_model("graph_spec_weak", tiny_config(R"("hidden_size": 24, "num_layers": 1)", false), 4).string(); }
std::string close_draft() { return make_model("graph_spec_close", graph_model_config(), 9, dtype::f32).string(); }
std::string perfect_draft() { return make_model("graph_spec_perfect", graph_model_config(), 9).string(); }

// Two stages, two shards, drafting never switched off; `scheduler`: scheduler fields.
std::string speculative_topology(const std::string& draft, const std::string& scheduler = "") {
  return R"({"stages": 2, "expert_shards": 2, "scheduler": {)" + scheduler + R"(},
            "speculation": {"draft": ")" + draft + R"(", "retry_after": 0, "max_batch": 0}})";
}

// Prompts where every other one holds two EOS-separated documents.
std::vector<std::int32_t> spec_prompt(int i, std::int32_t eos) {
  auto p = prompt_of(4 + 3 * i, 20 + i);
  if (i % 2 == 0) p[p.size() / 2] = eos;
  return p;
}

scheduler_metrics metrics_of(graph_fixture& f) {
  caf::scoped_actor self{*f.sys};
  scheduler_metrics m;
  self->request(f.graph.scheduler, std::chrono::seconds(5), metrics_atom::value)
      .receive([&](scheduler_metrics& r) { m = r; }, [&](caf::error& e) { ADD_FAILURE() << f.sys->render(e); });
  return m;
}

}  // namespace

TEST(graph_speculative, greedy_is_the_plain_forward_pass_for_mixed_draft_lengths) {
  for (const auto& [label, draft] : {std::pair<std::string, std::string>{"weak", weak_draft()},
                                     {"close", close_draft()},
                                     {"perfect", perfect_draft()}}) {
    graph_fixture f("graph_spec_greedy", speculative_topology(draft));
    std::vector<generate_request> reqs;
    std::map<std::string, std::vector<std::int32_t>> expected;
    double gap = 1;
    for (int i = 0; i < 12; ++i) {
      const auto prompt = spec_prompt(i, f.compute->net->config().eos_token_id);
      const int max_tokens = 6 + 3 * (i % 4);
      const std::string id = label + std::to_string(i);
      expected[id] = plain_greedy(*f.compute->net, prompt, max_tokens, gap);
      auto r = greedy_request(id, prompt, max_tokens);
      r.draft_tokens = std::array{1, 3, 5, 0}[static_cast<std::size_t>(i % 4)];  // k = 0: this request never drafts
      reqs.push_back(r);
    }
    EXPECT_GT(gap, 1e-5);  // ~100x the rounding differences batching makes: equal tokens are not luck
    const auto got = run_requests(f, reqs);
    std::int64_t drafted = 0, accepted = 0;
    for (const auto& r : reqs) {
      const auto& o = got.at(r.id);
      EXPECT_EQ(o.tokens, expected.at(r.id)) << label << " draft, request " << r.id << ", k = " << r.draft_tokens;
      EXPECT_NE(o.done.reason, request_end::error) << o.done.error;
      if (r.draft_tokens == 0) EXPECT_EQ(o.done.draft_rounds, 0) << r.id;
      drafted += o.done.drafted_tokens;
      accepted += o.done.accepted_tokens;
      if (label == "perfect") EXPECT_EQ(o.done.accepted_tokens, o.done.drafted_tokens) << r.id;
    }
    EXPECT_GT(drafted, 0) << label;
    if (label == "close") EXPECT_TRUE(accepted > 0 && accepted < drafted) << accepted << " of " << drafted;
    const auto m = metrics_of(f);
    ASSERT_EQ(m.drafts.size(), 1u);
    EXPECT_EQ(m.drafts[0].draft, std::filesystem::path(draft).filename().string());
    EXPECT_EQ(m.drafts[0].drafted, drafted);
    EXPECT_EQ(m.drafts[0].accepted, accepted);
    EXPECT_EQ(m.kv_blocks_used, 0);
    std::cerr << "  " << label << " draft: " << accepted << " of " << drafted << " drafted tokens accepted\n";
  }
}

TEST(graph_speculative, sampling_keeps_the_targets_distribution) {
  // The first two sampled tokens over many seeds, with the graph speculating (k = 2, drafts
  // verified by the rejection rule) and with the plain sampler: a two-sample chi-square.
  graph_fixture f("graph_spec_sampled", speculative_topology(weak_draft(), R"("max_waiting": 2000)"));
  const tokenizer tok = tokenizer::load(std::string(TROUPE_SOURCE_DIR) + "/configs/tokenizers/troupe-bpe-4k.json");
  const std::vector<std::int32_t> prompt{7, 11, 19};
  const int n = 1200;
  std::vector<generate_request> reqs;
  std::map<std::int32_t, int> plain, spec;
  generation_params params;
  params.sampling.temperature = 1.5f;  // flat enough that many pairs occur
  params.sampling.top_k = 6;
  params.max_tokens = 2;
  params.stop_on_eos = false;
  for (int i = 0; i < n; ++i) {
    params.sampling.seed = static_cast<std::uint64_t>(i);
    const auto a = generate(*f.compute->net, tok, prompt, params);
    ++plain[a.ids.at(1) + 1000 * a.ids.at(0)];
    generate_request r;
    r.id = std::to_string(i);
    r.prompt = prompt;
    r.sampling = params.sampling;
    r.max_tokens = 2;
    r.stop_on_eos = false;
    r.draft_tokens = 2;
    reqs.push_back(r);
  }
  const auto got = run_requests(f, reqs);
  std::int64_t rounds = 0;
  for (const auto& [id, o] : got) {
    ASSERT_EQ(o.tokens.size(), 2u) << id;
    ++spec[o.tokens[1] + 1000 * o.tokens[0]];
    rounds += o.done.draft_rounds;
  }
  EXPECT_GT(rounds, n / 2) << "the sampled requests hardly drafted";
  const auto [x, df] = test::two_sample_chi_square(plain, spec, 10);
  ASSERT_GT(df, 3);
  // chi-square(df) stays under df + 5 sqrt(2 df) except with negligible probability.
  EXPECT_LT(x, df + 5 * std::sqrt(2.0 * df)) << "df " << df;
}

TEST(graph_speculative, drafts_swapped_while_requests_stream_change_no_output) {
  const auto weak = weak_draft(), perfect = perfect_draft();
  const auto other = make_model("graph_spec_other", tiny_config(R"("vocab_size": 101)", false), 5).string();
  graph_fixture f("graph_spec_swap", speculative_topology(weak));
  std::vector<generate_request> reqs;
  std::map<std::string, std::vector<std::int32_t>> expected;
  double gap = 1;
  for (int i = 0; i < 32; ++i) {
    const auto prompt = spec_prompt(i % 8, f.compute->net->config().eos_token_id);
    const std::string id = "s" + std::to_string(i);
    expected[id] = plain_greedy(*f.compute->net, prompt, 24, gap);
    reqs.push_back(greedy_request(id, prompt, 24));
  }
  std::atomic<bool> streaming{true};
  int swaps = 0, refused = 0;
  std::thread swapper([&] {
    caf::scoped_actor self{*f.sys};
    for (int i = 0; streaming; ++i) {
      const std::string& next = i % 4 == 3 ? other : (i % 2 ? weak : perfect);
      self->request(f.graph.draft, std::chrono::seconds(30), load_draft_atom::value, next)
          .receive([&](std::string&) { ++swaps; },
                   [&](caf::error& e) {
                     EXPECT_NE(f.sys->render(e).find("vocabulary"), std::string::npos) << f.sys->render(e);
                     ++refused;
                   });
    }
  });
  const auto got = run_requests(f, reqs);
  streaming = false;
  swapper.join();
  for (const auto& r : reqs) EXPECT_EQ(got.at(r.id).tokens, expected.at(r.id)) << r.id;
  EXPECT_GE(swaps, 3);
  EXPECT_GE(refused, 1);
  // Rolling back twice returns to where it was.
  caf::scoped_actor self{*f.sys};
  std::string before, after;
  self->request(f.graph.draft, std::chrono::seconds(5), draft_info_atom::value).receive([&](std::string& s) { before = s; }, [](caf::error&) {});
  for (int i = 0; i < 2; ++i)
    self->request(f.graph.draft, std::chrono::seconds(30), rollback_atom::value)
        .receive([](std::string&) {}, [&](caf::error& e) { ADD_FAILURE() << f.sys->render(e); });
  self->request(f.graph.draft, std::chrono::seconds(5), draft_info_atom::value).receive([&](std::string& s) { after = s; }, [](caf::error&) {});
  EXPECT_EQ(before.substr(0, before.find("\"previous_dir\"")), after.substr(0, after.find("\"previous_dir\"")));
}

TEST(graph_speculative, large_batches_and_low_acceptance_turn_drafting_off) {
  // Above the batch cutoff nobody drafts; a request alone drafts every step. Two long requests
  // that never draft go first and outlast the others, so whenever one of the others is in a
  // step, so are both of them: every such step holds more than max_batch = 2 sequences, however
  // the arrivals interleave with their prefills.
  graph_fixture f("graph_spec_cutoff", R"({"speculation": {"draft": ")" + perfect_draft() + R"(", "max_batch": 2}})");
  std::vector<generate_request> reqs;
  for (int i = 0; i < 2; ++i) {
    auto blocker = greedy_request("blocker" + std::to_string(i), prompt_of(150, 1 + i), 60);
    blocker.draft_tokens = 0;
    blocker.stop_on_eos = false;
    reqs.push_back(blocker);
  }
  for (int i = 0; i < 4; ++i) {
    reqs.push_back(greedy_request("b" + std::to_string(i), prompt_of(5, i), 12));
    reqs.back().draft_tokens = 1;
    reqs.back().stop_on_eos = false;
  }
  for (const auto& [id, o] : run_requests(f, reqs)) EXPECT_EQ(o.done.draft_rounds, 0) << id;
  auto alone = greedy_request("alone", prompt_of(5, 9), 12);
  alone.draft_tokens = 1;
  alone.stop_on_eos = false;
  EXPECT_GE(run_requests(f, {alone}).at("alone").done.draft_rounds, 5);
  // A draft that is never right is switched off after its window and the output is unchanged.
  graph_fixture g("graph_spec_low", R"({"speculation": {"draft": ")" + weak_draft() +
                                        R"(", "window": 2, "min_acceptance": 3, "retry_after": 4}})");
  double gap = 1;
  const auto prompt = prompt_of(6, 4);
  const auto expected = plain_greedy(*g.compute->net, prompt, 30, gap);
  const auto got = run_requests(g, {greedy_request("low", prompt, 30)});
  EXPECT_EQ(got.at("low").tokens, expected);
  EXPECT_GE(metrics_of(g).speculation_off_switches, 1);
}

TEST(graph_speculative, a_draft_of_another_vocabulary_is_refused_at_start) {
  const auto other = make_model("graph_spec_other_start", tiny_config(R"("vocab_size": 101)", false), 5).string();
  try {
    graph_fixture f("graph_spec_refused", speculative_topology(other));
    ADD_FAILURE() << "a draft with another vocabulary was accepted";
  } catch (const input_error& e) {
    EXPECT_NE(std::string(e.what()).find("vocabulary"), std::string::npos) << e.what();
  }
  const auto cfg = graph_model_config();
  auto error_of = [&](const std::string& json) { return topology_error(json, cfg); };
  EXPECT_NE(error_of(R"({"speculation": {"draft_tokens": 3}})").find("speculation.draft"), std::string::npos);
  EXPECT_NE(error_of(R"({"speculation": {"draft": "d", "draft_tokens": 99}})").find("draft_tokens"), std::string::npos);
  EXPECT_NE(error_of(R"({"speculation": {"draft": "d", "k": 3}})").find("'speculation.k'"), std::string::npos);
  EXPECT_NE(error_of(R"({"speculation": {"draft": "d", "min_acceptance": "x"}})").find("min_acceptance"), std::string::npos);
}

TEST(graph_speculative, the_mtp_head_drafts_losslessly) {
  // A target with an MTP head (model.mtp.*) drafts for itself: greedy output stays the plain
  // forward pass's, and the head's drafts are verified like any draft's.
  graph_fixture f("graph_spec_mtp", R"({"stages": 2, "speculation": {"draft": "mtp", "retry_after": 0, "max_batch": 0}})",
                  R"("num_nextn_predict_layers": 1)");
  ASSERT_TRUE(f.compute->net->has_mtp());
  std::vector<generate_request> reqs;
  std::map<std::string, std::vector<std::int32_t>> expected;
  double gap = 1;
  for (int i = 0; i < 8; ++i) {
    const auto prompt = spec_prompt(i, f.compute->net->config().eos_token_id);
    const std::string id = "m" + std::to_string(i);
    expected[id] = plain_greedy(*f.compute->net, prompt, 16, gap);
    auto r = greedy_request(id, prompt, 16);
    r.draft_tokens = 1 + i % 3;
    reqs.push_back(r);
  }
  const auto got = run_requests(f, reqs);
  std::int64_t drafted = 0;
  for (const auto& r : reqs) {
    EXPECT_EQ(got.at(r.id).tokens, expected.at(r.id)) << r.id;
    drafted += got.at(r.id).done.drafted_tokens;
  }
  EXPECT_GT(drafted, 0);
  EXPECT_EQ(metrics_of(f).drafts.at(0).draft, "mtp");
  // A target without an MTP head refuses it, at start and as a swap.
  try {
    graph_fixture g("graph_spec_no_mtp", R"({"speculation": {"draft": "mtp"}})");
    ADD_FAILURE() << "a target without an MTP head accepted the mtp draft";
  } catch (const input_error& e) {
    EXPECT_NE(std::string(e.what()).find("no MTP head"), std::string::npos) << e.what();
  }
}

TEST(graph_speculative, the_mtp_head_fed_in_pieces_equals_one_pass) {
  // The MTP layer's cache and positions: rows fed one step at a time give the hidden states of
  // one pass over all rows.
  cpu_backend be(1);
  auto net = model::load(make_model("mtp_pieces", tiny_config(R"("num_nextn_predict_layers": 1)"), 6, dtype::f32), be);
  const auto h = net->config().hidden_size;
  const std::int64_t n = 9;
  tensor tokens = tensor::empty({n}, dtype::i32), hidden = tensor::empty({n, h}, dtype::f32);
  rng gen(3);
  for (std::int64_t i = 0; i < n; ++i) tokens.data<std::int32_t>()[i] = static_cast<std::int32_t>(3 + gen.next() % 90);
  for (std::int64_t i = 0; i < n * h; ++i) hidden.data<float>()[i] = static_cast<float>(gen.normal());
  latent_block_allocator blocks(be, default_kv_block_tokens, net->config().kv_lora_rank + net->config().qk_rope_head_dim);
  latent_cache whole, pieces;
  latent_cache* one[] = {&whole};
  const std::vector<std::int64_t> all_rows{n}, zero{0};
  const tensor expected = net->mtp_forward(tokens, hidden, step_layout::make(all_rows, zero), one, blocks);
  latent_cache* piece[] = {&pieces};
  for (std::int64_t start = 0; start < n; start += 4) {
    const std::int64_t rows = std::min<std::int64_t>(4, n - start);
    tensor t = tensor::empty({rows}, dtype::i32), x = tensor::empty({rows, h}, dtype::f32);
    std::copy_n(tokens.data<std::int32_t>() + start, rows, t.data<std::int32_t>());
    std::copy_n(hidden.data<float>() + start * h, rows * h, x.data<float>());
    const std::vector<std::int64_t> r{rows}, p{start};
    const tensor got = net->mtp_forward(t, x, step_layout::make(r, p), piece, blocks);
    EXPECT_LT(relative_l2(got.data<float>(), expected.data<float>() + start * h, static_cast<std::size_t>(rows * h)), 1e-5)
        << "rows " << start << "..";
  }
  const tensor logits = net->mtp_logits(expected);
  EXPECT_EQ(logits.dim(1), net->config().vocab_size);
}

}  // namespace troupe
