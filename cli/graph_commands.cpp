// The actor graph from the command line: `generate --topology` runs a request through the
// graph (instead of the plain forward pass), and `expert-host` hosts expert shards for a
// graph in another process, published on loopback or a network address via CAF's middleman.
#include <CLI/CLI.hpp>
#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/io/middleman.hpp>
#include <caf/scoped_actor.hpp>

#include <csignal>
#include <iostream>
#include <thread>

#include "actors/compute.hpp"
#include "cli/commands.hpp"
#include "graph/inference_graph.hpp"
#include "model/generator.hpp"
#include "protocol/errors.hpp"
#include "protocol/type_registry.hpp"
#include "tokenizer/tokenizer.hpp"

namespace troupe::cli {
namespace {

volatile std::sig_atomic_t stop_requested = 0;

std::unique_ptr<caf::actor_system> make_system(caf::actor_system_config& cfg) {
  add_message_types(cfg);
  cfg.load<caf::io::middleman>();
  return std::make_unique<caf::actor_system>(cfg);
}

topology topology_for(const std::string& spec, const model_config& config) {
  return spec == "local" ? local_topology(config) : load_topology(spec, config);
}

}  // namespace

int generate_with_graph(const std::string& model_dir, const std::string& topology_spec, const tokenizer& tok,
                        const std::vector<std::int32_t>& prompt, const generation_params& params, int threads) {
  if (!params.stop.empty()) throw input_error("--stop is not supported with --topology yet");
  caf::actor_system_config cfg;
  auto sys = make_system(cfg);
  auto compute = load_compute(model_dir, threads);
  auto graph = inference_graph::start(*sys, compute, topology_for(topology_spec, compute->net->config()));
  int status = 0;
  {
    caf::scoped_actor self{*sys};
    generate_request req;
    req.id = "cli";
    req.prompt = prompt;
    req.sampling = params.sampling;
    req.max_tokens = params.max_tokens;
    req.stop_on_eos = params.stop_on_eos;
    std::string refused;
    self->request(graph.scheduler, std::chrono::seconds(30), generate_atom::value, req, caf::actor_cast<caf::actor>(self))
        .receive([](bool) {}, [&](caf::error& e) { refused = sys->render(e); });
    if (!refused.empty()) {
      graph.stop(*sys);
      throw input_error(refused);
    }
    stream_decoder decoder(tok);
    for (bool done = false; !done;) {
      self->receive(
          [&](token_atom, std::string&, std::int32_t token) {
            if (token != compute->net->config().eos_token_id || !req.stop_on_eos) std::cout << decoder.push(token) << std::flush;
          },
          [&](done_atom, request_done& d) {
            std::cout << decoder.flush() << "\n";
            std::cerr << "[generate] graph '" << topology_spec << "': " << d.completion_tokens << " tokens, finish: "
                      << to_string(d.reason) << (d.error.empty() ? "" : " (" + d.error + ")") << "\n";
            if (d.reason == request_end::error) status = 1;
            done = true;
          });
    }
  }
  graph.stop(*sys);
  return status;
}

void add_graph_commands(CLI::App& app, std::function<int()>& run) {
  struct host_opts {
    std::string model, topology = "local", host = "127.0.0.1";
    std::vector<std::int64_t> shards;
    int port = 4300, threads = 0;
  };
  auto o = std::make_shared<host_opts>();
  auto* cmd = app.add_subcommand("expert-host", "Host expert shards of a topology for a graph in another process");
  cmd->add_option("--model", o->model, "model directory")->required()->check(CLI::ExistingDirectory);
  cmd->add_option("--topology", o->topology, "topology file naming the shards (or 'local')")->capture_default_str();
  cmd->add_option("--shards", o->shards, "shard indices to host")->required();
  cmd->add_option("--host", o->host, "address to listen on")->capture_default_str();
  cmd->add_option("--port", o->port, "port of the first shard; shard i of --shards listens on port + i")->capture_default_str();
  cmd->add_option("--threads", o->threads, "CPU threads; 0 = all cores")->capture_default_str();
  cmd->callback([&run, o] {
    run = [o] {
      caf::actor_system_config cfg;
      auto sys = make_system(cfg);
      auto compute = load_compute(o->model, o->threads);
      const auto topo = topology_for(o->topology, compute->net->config());
      auto shards = host_expert_shards(*sys, compute, topo, o->shards, o->host, static_cast<std::uint16_t>(o->port));
      std::cerr << "[expert-host] serving " << shards.size() << " shard(s) on " << o->host << ":" << o->port
                << (shards.size() > 1 ? "+" : "") << "; SIGTERM or SIGINT stops" << std::endl;
      std::signal(SIGTERM, [](int) { stop_requested = 1; });
      std::signal(SIGINT, [](int) { stop_requested = 1; });
      while (!stop_requested) std::this_thread::sleep_for(std::chrono::milliseconds(100));
      for (const auto& s : shards) caf::anon_send_exit(s, caf::exit_reason::user_shutdown);
      std::cerr << "[expert-host] stopped\n";
      return 0;
    };
  });
}

}  // namespace troupe::cli
