// Costs of the actor graph, each against its baseline in the same run:
//   hop      request/response round trip between two actors in this process, and across a
//            loopback CAF middleman connection to a second process (`--echo PORT` is that peer);
//   overhead batch-1 greedy decode through the graph (one stage, one shard) against the plain
//            forward pass on the same model: the graph's share of a decode step;
//   batching total tokens/s with 1, 8 and 32 concurrent requests against the same requests one
//            at a time.
//   troupe_bench_graph MODEL_DIR [TOKENS]      |      troupe_bench_graph --echo PORT
#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/event_based_actor.hpp>
#include <caf/io/middleman.hpp>
#include <caf/scoped_actor.hpp>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <thread>

#include "actors/compute.hpp"
#include "graph/inference_graph.hpp"
#include "protocol/type_registry.hpp"

using namespace std::chrono;
namespace {

using ping_atom = caf::atom_constant<caf::atom("ping")>;

caf::behavior echo(caf::event_based_actor*) {
  return {[](ping_atom, troupe::step_result& r) { return r; }};
}

double round_trip_us(caf::actor_system& sys, const caf::actor& target, int n) {
  caf::scoped_actor self{sys};
  troupe::step_result r;
  r.sequences = {1, 2, 3};
  r.tokens = {4, 5, 6};
  for (int i = 0; i < 100; ++i) self->request(target, seconds(10), ping_atom::value, r).receive([](troupe::step_result&) {}, [](caf::error&) {});
  const auto t0 = steady_clock::now();
  for (int i = 0; i < n; ++i) self->request(target, seconds(10), ping_atom::value, r).receive([](troupe::step_result&) {}, [](caf::error&) {});
  return duration<double, std::micro>(steady_clock::now() - t0).count() / n;
}

// Runs `reqs` through the graph concurrently; returns wall seconds.
double run_concurrent(caf::actor_system& sys, troupe::inference_graph& g, const std::vector<troupe::generate_request>& reqs) {
  caf::scoped_actor self{sys};
  const auto t0 = steady_clock::now();
  std::size_t open = 0;
  for (const auto& r : reqs)
    self->request(g.scheduler, seconds(10), troupe::generate_atom::value, r, caf::actor_cast<caf::actor>(self))
        .receive([&](bool) { ++open; }, [&](caf::error& e) { std::fprintf(stderr, "%s\n", sys.render(e).c_str()); });
  while (open > 0)
    self->receive([](troupe::token_atom, std::string&, std::int32_t) {}, [&](troupe::done_atom, troupe::request_done&) { --open; });
  return duration<double>(steady_clock::now() - t0).count();
}

troupe::generate_request request(int i, int tokens) {
  troupe::generate_request r;
  r.id = "r" + std::to_string(i);
  for (int j = 0; j < 16; ++j) r.prompt.push_back(3 + (i * 131 + j * 17) % 1000);
  r.sampling.temperature = 0;
  r.max_tokens = tokens;
  r.stop_on_eos = false;
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  caf::actor_system_config cfg;
  troupe::add_message_types(cfg);
  cfg.add_message_type<troupe::step_result>("troupe::step_result");
  cfg.load<caf::io::middleman>();
  caf::actor_system sys{cfg};
  if (argc == 3 && std::string(argv[1]) == "--echo") {
    auto e = sys.spawn(echo);
    if (!sys.middleman().publish(e, static_cast<std::uint16_t>(std::atoi(argv[2])), "127.0.0.1", true)) return 1;
    std::this_thread::sleep_for(seconds(120));
    return 0;
  }
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s MODEL_DIR [TOKENS] | --echo PORT\n", argv[0]);
    return 2;
  }
  const int tokens = argc > 2 ? std::atoi(argv[2]) : 32;

  // Hops.
  const double local_us = round_trip_us(sys, sys.spawn(echo), 20000);
  const int port = 30000 + static_cast<int>(getpid() % 20000);
  const std::string server = std::string(argv[0]) + " --echo " + std::to_string(port) + " &";
  if (std::system(server.c_str()) != 0) return 1;
  caf::expected<caf::actor> remote = caf::sec::runtime_error;
  for (int i = 0; i < 100 && !remote; ++i) {
    std::this_thread::sleep_for(milliseconds(50));
    remote = sys.middleman().remote_actor("127.0.0.1", static_cast<std::uint16_t>(port));
  }
  const double remote_us = remote ? round_trip_us(sys, *remote, 5000) : -1;
  if (remote) caf::anon_send_exit(*remote, caf::exit_reason::user_shutdown);
  std::printf("hop round trip: in process %.1f us, loopback middleman %.1f us (x%.1f)\n", local_us, remote_us,
              remote_us / local_us);

  // Overhead per decode step.
  auto compute = troupe::load_compute(argv[1], 0);
  const auto& config = compute->net->config();
  const auto req = request(0, tokens);
  double plain_s;
  {
    const auto t0 = steady_clock::now();
    troupe::sequence_state s;
    std::vector<std::int32_t> step = req.prompt;
    troupe::step_input in{&s, step};
    auto logits = compute->net->forward({&in, 1}, troupe::logits_mode::last_token);
    const auto t1 = steady_clock::now();
    for (int i = 1; i < tokens; ++i) {
      step.assign(1, troupe::argmax({logits.data<float>(), static_cast<std::size_t>(config.vocab_size)}));
      troupe::step_input d{&s, step};
      logits = compute->net->forward({&d, 1}, troupe::logits_mode::last_token);
    }
    plain_s = duration<double>(steady_clock::now() - t1).count() / (tokens - 1);
    (void)t0;
  }
  auto graph = troupe::inference_graph::start(sys, compute, troupe::local_topology(config));
  run_concurrent(sys, graph, {request(99, 4)});  // warm-up
  const double graph_total = run_concurrent(sys, graph, {req});
  // The graph's time includes the prefill step; subtract one plain prefill-sized share by timing
  // the same request with 1 token.
  auto one = req;
  one.max_tokens = 1;
  const double graph_prefill = run_concurrent(sys, graph, {one});
  const double graph_s = (graph_total - graph_prefill) / (tokens - 1);
  std::printf("decode step (batch 1, %s): plain forward %.3f ms, graph %.3f ms: actor overhead %.3f ms = %.1f%% of a step\n",
              argv[1], plain_s * 1e3, graph_s * 1e3, (graph_s - plain_s) * 1e3, 100 * (graph_s - plain_s) / graph_s);

  // Batching.
  for (int n : {1, 8, 32}) {
    std::vector<troupe::generate_request> reqs;
    for (int i = 0; i < n; ++i) reqs.push_back(request(i, tokens));
    double sequential = 0;
    for (const auto& r : reqs) sequential += run_concurrent(sys, graph, {r});
    const double together = run_concurrent(sys, graph, reqs);
    std::printf("%2d requests x %d tokens: one at a time %.1f tok/s, concurrently %.1f tok/s (x%.2f)\n", n, tokens,
                n * tokens / sequential, n * tokens / together, sequential / together);
  }
  graph.stop(sys);
  return 0;
}
