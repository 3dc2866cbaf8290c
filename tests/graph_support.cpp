#include "tests/graph_support.hpp"

#include <gtest/gtest.h>

#include <caf/io/middleman.hpp>
#include <caf/scoped_actor.hpp>

#include "protocol/errors.hpp"
#include "protocol/type_registry.hpp"
#include "tests/test_support.hpp"

namespace troupe::test {

model_config graph_model_config(const std::string& overrides) {
  return tiny_config(R"("num_layers": 3, "max_position_embeddings": 256)" + (overrides.empty() ? "" : ", " + overrides));
}

graph_fixture::graph_fixture(const std::string& name, const std::string& topology_json, const std::string& config_overrides) {
  add_message_types(cfg);
  cfg.load<caf::io::middleman>();
  sys = std::make_unique<caf::actor_system>(cfg);
  const auto dir = make_model(name, graph_model_config(config_overrides), 9);
  compute = load_compute(dir.string(), 1);
  graph = inference_graph::start(*sys, compute, parse_topology(topology_json, "test-topology", compute->net->config()));
}

graph_fixture::~graph_fixture() { graph.stop(*sys); }

std::map<std::string, outcome> run_requests(graph_fixture& f, const std::vector<generate_request>& reqs,
                                            std::vector<std::string>* refusals) {
  caf::scoped_actor self{*f.sys};
  std::map<std::string, outcome> out;
  std::size_t open = 0;
  for (const auto& r : reqs) {
    self->request(f.graph.scheduler, std::chrono::seconds(10), generate_atom::value, r, caf::actor_cast<caf::actor>(self))
        .receive([&](bool) { ++open; },
                 [&](caf::error& e) {
                   if (refusals) refusals->push_back(f.sys->render(e));
                   else ADD_FAILURE() << f.sys->render(e);
                 });
  }
  bool timed_out = false;
  while (open > 0 && !timed_out) {
    self->receive([&](token_atom, std::string& id, std::int32_t token) { out[id].tokens.push_back(token); },
                  [&](done_atom, request_done& d) {
                    out[d.id].done = d;
                    --open;
                  },
                  caf::after(std::chrono::seconds(60)) >> [&] { timed_out = true; });
  }
  EXPECT_FALSE(timed_out) << "requests did not finish";
  return out;
}

std::vector<std::int32_t> plain_greedy(model& m, const std::vector<std::int32_t>& prompt, int max_tokens, double& min_gap) {
  sequence_state s;
  std::vector<std::int32_t> out, step = prompt;
  for (int i = 0; i < max_tokens; ++i) {
    const step_input in{&s, step};
    const tensor logits = m.forward({&in, 1}, logits_mode::last_token);
    std::vector<float> l(logits.data<float>(), logits.data<float>() + logits.dim(1));
    const auto best = argmax(l);
    float second = -1e30f, lo = 1e30f, hi = -1e30f;
    for (std::size_t j = 0; j < l.size(); ++j) {
      if (static_cast<std::int32_t>(j) != best) second = std::max(second, l[j]);
      lo = std::min(lo, l[j]), hi = std::max(hi, l[j]);
    }
    min_gap = std::min(min_gap, static_cast<double>(l[static_cast<std::size_t>(best)] - second) / (hi - lo));
    out.push_back(best);
    if (best == m.config().eos_token_id) break;
    step.assign(1, best);
  }
  return out;
}

generate_request greedy_request(const std::string& id, std::vector<std::int32_t> prompt, int max_tokens) {
  generate_request r;
  r.id = id;
  r.prompt = std::move(prompt);
  r.sampling.temperature = 0;
  r.max_tokens = max_tokens;
  return r;
}

std::vector<std::int32_t> prompt_of(int length, int seed) {
  std::vector<std::int32_t> p;
  for (int i = 0; i < length; ++i) p.push_back(3 + (i * 37 + seed * 11) % 90);
  return p;
}

std::string topology_error(const std::string& json, const model_config& config) {
  try {
    parse_topology(json, "topo.json", config);
  } catch (const input_error& e) {
    return e.what();
  }
  return {};
}

}  // namespace troupe::test
