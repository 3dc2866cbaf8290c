// The inference graph against the plain forward pass: greedy tokens must be identical for one
// request and for many concurrent requests of different lengths (continuous batching), with
// several attention stages and expert shards; plus refusals, cancellation and failures.
#include <gtest/gtest.h>

#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/io/middleman.hpp>
#include <caf/scoped_actor.hpp>

#include <map>
#include <thread>

#include "actors/compute.hpp"
#include "actors/tokenizer_actor.hpp"
#include "graph/inference_graph.hpp"
#include "protocol/errors.hpp"
#include "protocol/type_registry.hpp"
#include "tests/graph_support.hpp"
#include "tests/test_support.hpp"

namespace troupe {

using namespace test;

TEST(graph, one_request_matches_the_plain_forward_pass) {
  graph_fixture f("graph_one", R"({"stages": 2, "expert_shards": 3})");
  double gap = 1;
  const auto prompt = prompt_of(9, 1);
  const auto expected = plain_greedy(*f.compute->net, prompt, 12, gap);
  const auto got = run_requests(f, {greedy_request("a", prompt, 12)});
  EXPECT_EQ(got.at("a").tokens, expected);
  EXPECT_NE(got.at("a").done.reason, request_end::error) << got.at("a").done.error;
}

// Batching changes GEMM shapes (and so float rounding in the last bits) but every greedy
// choice below has a top-1/top-2 gap of at least 1e-4 of the logit range, ~1000x the
// rounding difference, so identical tokens are not luck.
TEST(graph, concurrent_requests_of_different_lengths_match_each_alone) {
  graph_fixture f("graph_many", R"({"stages": 3, "expert_shards": 2, "scheduler": {"max_running": 5}})");
  std::vector<generate_request> reqs;
  std::map<std::string, std::vector<std::int32_t>> expected;
  double gap = 1;
  for (int i = 0; i < 8; ++i) {
    const auto prompt = prompt_of(3 + 5 * i, i);
    const int max_tokens = 4 + 3 * (i % 4);
    const std::string id = "r" + std::to_string(i);
    expected[id] = plain_greedy(*f.compute->net, prompt, max_tokens, gap);
    reqs.push_back(greedy_request(id, prompt, max_tokens));
  }
  EXPECT_GT(gap, 1e-4);
  const auto got = run_requests(f, reqs);
  for (const auto& [id, tokens] : expected) {
    EXPECT_EQ(got.at(id).tokens, tokens) << id;
    EXPECT_EQ(got.at(id).done.completion_tokens, static_cast<std::int64_t>(tokens.size()));
  }
  caf::scoped_actor self{*f.sys};
  self->request(f.graph.scheduler, std::chrono::seconds(5), metrics_atom::value)
      .receive(
          [&](scheduler_metrics& m) {
            EXPECT_EQ(m.requests_finished, 8);
            EXPECT_EQ(m.running, 0);
            EXPECT_EQ(m.kv_blocks_used, 0);  // every request's blocks came back
            EXPECT_GT(m.steps, 0);
          },
          [&](caf::error& e) { ADD_FAILURE() << f.sys->render(e); });
}

TEST(graph, bad_requests_are_refused_or_fail_alone) {
  graph_fixture f("graph_bad", R"({"stages": 1, "expert_shards": 1, "scheduler": {"max_waiting": 4, "kv_blocks": 64}})");
  std::vector<std::string> refusals;
  auto too_long = greedy_request("long", prompt_of(200, 1), 100);  // 300 > max_position_embeddings 256
  auto empty = greedy_request("empty", {}, 4);
  auto bad_temp = greedy_request("temp", prompt_of(4, 1), 4);
  bad_temp.sampling.temperature = -1;
  run_requests(f, {too_long, empty, bad_temp}, &refusals);
  ASSERT_EQ(refusals.size(), 3u);
  EXPECT_NE(refusals[0].find("exceeds the context length"), std::string::npos) << refusals[0];
  EXPECT_NE(refusals[1].find("prompt is empty"), std::string::npos) << refusals[1];
  EXPECT_NE(refusals[2].find("temperature"), std::string::npos) << refusals[2];
  // A token outside the vocabulary fails its own request in the embedding, not the others.
  auto bad_token = greedy_request("bad", {5, 97, 6}, 4);
  auto good = greedy_request("good", prompt_of(5, 2), 4);
  const auto got = run_requests(f, {bad_token});
  EXPECT_EQ(got.at("bad").done.reason, request_end::error);
  EXPECT_NE(got.at("bad").done.error.find("outside the vocabulary"), std::string::npos) << got.at("bad").done.error;
  const auto after = run_requests(f, {good});
  EXPECT_EQ(after.at("good").done.reason, request_end::length);
  EXPECT_EQ(after.at("good").tokens.size(), 4u);
}

TEST(graph, cancelling_ends_a_request_and_frees_its_blocks) {
  graph_fixture f("graph_cancel", R"({"stages": 2})");
  caf::scoped_actor self{*f.sys};
  auto req = greedy_request("c", prompt_of(6, 3), 200);
  req.stop_on_eos = false;
  self->request(f.graph.scheduler, std::chrono::seconds(5), generate_atom::value, req, caf::actor_cast<caf::actor>(self))
      .receive([](bool) {}, [&](caf::error& e) { FAIL() << f.sys->render(e); });
  int tokens = 0;
  bool done = false;
  request_done result;
  while (!done) {
    self->receive(
        [&](token_atom, std::string&, std::int32_t) {
          if (++tokens == 3) self->send(f.graph.scheduler, cancel_atom::value, std::string("c"));
        },
        [&](done_atom, request_done& d) {
          result = d;
          done = true;
        },
        caf::after(std::chrono::seconds(60)) >> [&] { done = true; });
  }
  EXPECT_EQ(result.reason, request_end::cancelled);
  EXPECT_LT(tokens, 200);
  self->request(f.graph.scheduler, std::chrono::seconds(5), metrics_atom::value)
      .receive([&](scheduler_metrics& m) { EXPECT_EQ(m.kv_blocks_used, 0); },
               [&](caf::error& e) { ADD_FAILURE() << f.sys->render(e); });
}

// Kills one actor while a request streams: that request ends with an error naming what failed
// (no hang), the supervisor restarts the actor from its weights, and the next request gets
// exactly the plain forward pass's tokens.
void kill_mid_generation(const std::string& victim_name, const std::function<caf::actor(graph_fixture&)>& victim,
                         const std::string& topology = R"({"stages": 2, "expert_shards": 2})") {
  graph_fixture f("graph_fault", topology);
  caf::scoped_actor self{*f.sys};
  auto req = greedy_request("long", prompt_of(6, 5), 200);
  req.stop_on_eos = false;
  self->request(f.graph.scheduler, std::chrono::seconds(5), generate_atom::value, req, caf::actor_cast<caf::actor>(self))
      .receive([](bool) {}, [&](caf::error& e) { FAIL() << f.sys->render(e); });
  request_done result;
  int tokens = 0;
  for (bool done = false; !done;) {
    self->receive(
        [&](token_atom, std::string&, std::int32_t) {
          if (++tokens == 3) caf::anon_send_exit(victim(f), caf::exit_reason::kill);
        },
        [&](done_atom, request_done& d) {
          result = d;
          done = true;
        },
        caf::after(std::chrono::seconds(60)) >> [&] {
          ADD_FAILURE() << "the request hung after " << victim_name << " died";
          done = true;
        });
  }
  EXPECT_EQ(result.reason, request_end::error) << victim_name;
  EXPECT_FALSE(result.error.empty());
  std::cerr << "  " << victim_name << " killed: request error: " << result.error << "\n";
  // Wait for the restart.
  const auto index = static_cast<std::size_t>(
      std::find(f.graph.supervised_names.begin(), f.graph.supervised_names.end(), victim_name) - f.graph.supervised_names.begin());
  ASSERT_LT(index, f.graph.supervised_names.size()) << victim_name;
  int restarts = 0;
  for (int attempt = 0; attempt < 200 && restarts == 0; ++attempt) {
    self->request(f.graph.supervisor, std::chrono::seconds(5), metrics_atom::value)
        .receive([&](std::vector<int>& r) { restarts = r[index]; }, [&](caf::error&) {});
    if (restarts == 0) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_EQ(restarts, 1) << victim_name;
  double gap = 1;
  const auto prompt = prompt_of(7, 6);
  const auto expected = plain_greedy(*f.compute->net, prompt, 8, gap);
  const auto got = run_requests(f, {greedy_request("next", prompt, 8)});
  EXPECT_EQ(got.at("next").tokens, expected) << "after restarting " << victim_name;
}

TEST(graph, killed_expert_shard_fails_its_request_and_is_restarted) {
  kill_mid_generation("expert shard 1", [](graph_fixture& f) { return caf::actor_cast<caf::actor>(f.graph.shards[1]); });
}

TEST(graph, killed_stage_fails_its_request_and_is_restarted) {
  kill_mid_generation("stage 1 (blocks 1-2)", [](graph_fixture& f) { return caf::actor_cast<caf::actor>(f.graph.stages[1]); });
}

TEST(graph, killed_head_fails_its_request_and_is_restarted) {
  kill_mid_generation("head", [](graph_fixture& f) { return caf::actor_cast<caf::actor>(f.graph.stages.back()); });
}

TEST(graph, killed_embedding_fails_its_request_and_is_restarted) {
  kill_mid_generation("embedding", [](graph_fixture& f) { return caf::actor_cast<caf::actor>(f.graph.embedding); });
}

TEST(graph, killed_router_fails_its_request_and_is_restarted) {
  kill_mid_generation("router", [](graph_fixture& f) { return caf::actor_cast<caf::actor>(f.graph.router); });
}

TEST(graph, killed_draft_fails_its_request_and_is_restarted) {
  const auto draft = make_model("graph_fault_draft", tiny_config(R"("hidden_size": 24, "num_layers": 1)", false), 4);
  kill_mid_generation("draft", [](graph_fixture& f) { return caf::actor_cast<caf::actor>(f.graph.draft); },
                      R"({"stages": 2, "expert_shards": 2, "speculation": {"draft": ")" + draft.string() + R"(", "max_batch": 0}})");
}

TEST(graph, tokenizer_actor_encodes_and_streams_whole_characters) {
  caf::actor_system_config cfg;
  add_message_types(cfg);
  caf::actor_system sys{cfg};
  auto tok = std::make_shared<const tokenizer>(
      tokenizer::load(std::string(TROUPE_SOURCE_DIR) + "/configs/tokenizers/troupe-bpe-4k.json"));
  auto actor = spawn_tokenizer(sys, tok);
  caf::scoped_actor self{sys};
  const std::string text = "Caf\xc3\xa9 \xe2\x82\xac 42 <|eos|>";
  std::vector<std::int32_t> ids;
  self->request(actor, std::chrono::seconds(5), encode_atom::value, text, true)
      .receive([&](std::vector<std::int32_t>& r) { ids = r; }, [&](caf::error& e) { FAIL() << sys.render(e); });
  EXPECT_EQ(ids, tok->encode(text, special_tokens::parse));
  EXPECT_EQ(ids.back(), 2);
  // Two interleaved streams decode independently, each piece ending on a character boundary.
  std::string a, b;
  for (auto id : ids) {
    for (auto* out : {&a, &b}) {
      self->request(actor, std::chrono::seconds(5), decode_atom::value, std::string(out == &a ? "a" : "b"), id)
          .receive(
              [&](std::string& piece) {
                EXPECT_EQ(complete_utf8_prefix(piece), piece.size());
                *out += piece;
              },
              [&](caf::error& e) { FAIL() << sys.render(e); });
    }
  }
  for (auto* out : {&a, &b})
    self->request(actor, std::chrono::seconds(5), flush_atom::value, std::string(out == &a ? "a" : "b"))
        .receive([&](std::string& rest) { *out += rest; }, [&](caf::error&) {});
  EXPECT_EQ(a, text);
  EXPECT_EQ(b, text);
  self->request(actor, std::chrono::seconds(5), decode_atom::value, std::string("c"), std::int32_t{999999})
      .receive([&](std::string&) { ADD_FAILURE() << "an unknown id must be refused"; },
               [&](caf::error& e) { EXPECT_NE(sys.render(e).find("outside the tokenizer"), std::string::npos); });
  caf::anon_send_exit(actor, caf::exit_reason::user_shutdown);
}

TEST(graph, topology_errors_name_the_field) {
  const auto cfg = test::tiny_config(R"("num_layers": 3)");
  auto error_of = [&](const std::string& json) { return topology_error(json, cfg); };
  EXPECT_NE(error_of(R"({"stages": 4})").find("'stages'"), std::string::npos);
  EXPECT_NE(error_of(R"({"stage_blocks": [[0, 1], [2, 3]]})").find("'stage_blocks'"), std::string::npos);
  EXPECT_NE(error_of(R"({"expert_shards": 7})").find("'expert_shards'"), std::string::npos);
  EXPECT_NE(error_of(R"({"stagez": 1})").find("'stagez' is not a topology field"), std::string::npos);
  EXPECT_NE(error_of(R"({"remote_expert_shards": [{"shard": 0, "endpoint": "nohost"}]})").find("endpoint"),
            std::string::npos);
  EXPECT_NE(error_of(R"({"scheduler": {"kv_blocks": 0}})").find("'scheduler'"), std::string::npos);
  EXPECT_NE(error_of("{oops").find("not a JSON object"), std::string::npos);
  const auto t = parse_topology(R"({"stage_blocks": [[0, 2], [2, 3]], "expert_shards": 4})", "t", cfg);
  ASSERT_EQ(t.stage_blocks.size(), 2u);
  EXPECT_EQ(t.stage_blocks[1], (std::pair<std::int64_t, std::int64_t>{2, 3}));
  EXPECT_EQ(t.shard_experts.size(), 4u);
}

}  // namespace troupe
