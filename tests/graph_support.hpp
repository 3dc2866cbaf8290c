// The inference graph in tests: a fixture that serves a random tiny model through a topology,
// a driver that submits requests and collects their events, and the plain forward pass's
// greedy tokens to compare with.
#pragma once

#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "actors/compute.hpp"
#include "graph/inference_graph.hpp"

namespace troupe::test {

/// The config of graph_fixture's model (3 blocks, 256 positions), with `overrides` merged in.
model_config graph_model_config(const std::string& overrides = "");

struct graph_fixture {
  caf::actor_system_config cfg;
  std::unique_ptr<caf::actor_system> sys;
  shared_compute compute;
  inference_graph graph;

  /// Serves a random model of graph_model_config(config_overrides) (seed 9) through `topology_json`.
  graph_fixture(const std::string& name, const std::string& topology_json, const std::string& config_overrides = "");
  ~graph_fixture();
};

struct outcome {
  std::vector<std::int32_t> tokens;
  request_done done;
};

/// Submits every request, then collects events until each has its done event; refusals go to
/// `refusals` (a test failure without it).
std::map<std::string, outcome> run_requests(graph_fixture& f, const std::vector<generate_request>& reqs,
                                            std::vector<std::string>* refusals = nullptr);

/// Greedy generation with the plain forward pass (stopping at EOS); records the smallest
/// top-1/top-2 logit gap relative to the logits' spread, to show agreement cannot come from luck.
std::vector<std::int32_t> plain_greedy(model& m, const std::vector<std::int32_t>& prompt, int max_tokens, double& min_gap);

generate_request greedy_request(const std::string& id, std::vector<std::int32_t> prompt, int max_tokens);

/// The input_error parse_topology(json) throws for `config`, or "" when it parses.
std::string topology_error(const std::string& json, const model_config& config);

/// A deterministic prompt of `length` ids in [3, 93).
std::vector<std::int32_t> prompt_of(int length, int seed);

}  // namespace troupe::test
