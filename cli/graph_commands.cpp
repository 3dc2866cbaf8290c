// The actor graph from the command line: `generate --topology` runs a request through the
// graph (instead of the plain forward pass), and `expert-host` hosts expert shards for a
// graph in another process, published on loopback or a network address via CAF's middleman.
#include <CLI/CLI.hpp>
#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/io/middleman.hpp>
#include <caf/scoped_actor.hpp>

#include <algorithm>
#include <pthread.h>

#include <csignal>
#include <filesystem>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <iostream>
#include <thread>

#include "actors/compute.hpp"
#include "gateway/server.hpp"
#include "cli/commands.hpp"
#include "graph/inference_graph.hpp"
#include "model/generator.hpp"
#include "protocol/errors.hpp"
#include "protocol/type_registry.hpp"
#include "tokenizer/tokenizer.hpp"

namespace troupe::cli {
namespace {

// SIGTERM and SIGINT are blocked in every thread (set before any thread starts) and taken by
// the main thread with sigtimedwait, so a signal never lands in a compute or I/O thread.
class stop_signals {
 public:
  stop_signals() {
    sigemptyset(&set_);
    sigaddset(&set_, SIGTERM);
    sigaddset(&set_, SIGINT);
    pthread_sigmask(SIG_BLOCK, &set_, nullptr);
  }
  /// Waits until SIGTERM or SIGINT arrives.
  void wait() const {
    const timespec tick{0, 100'000'000};
    while (sigtimedwait(&set_, nullptr, &tick) < 0) {
    }
  }

 private:
  sigset_t set_;
};

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
                        const std::vector<std::int32_t>& prompt, const generation_params& params, int threads,
                        const std::string& device) {
  if (!params.stop.empty()) throw input_error("--stop is not supported with --topology yet");
  caf::actor_system_config cfg;
  auto sys = make_system(cfg);
  auto compute = load_compute(model_dir, threads, device);
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

namespace {

// Keys from a file (one per line, # comments) and from the environment variable `env_name`
// (comma-separated).
std::vector<std::string> read_keys(const std::string& file, const char* env_name) {
  std::vector<std::string> keys;
  auto add_lines = [&](std::istream& in) {
    for (std::string line; std::getline(in, line);) {
      line.erase(0, line.find_first_not_of(" \t\r"));
      line.erase(line.find_last_not_of(" \t\r") + 1);
      if (!line.empty() && line[0] != '#') keys.push_back(line);
    }
  };
  if (!file.empty()) {
    std::ifstream in(file);
    if (!in) throw input_error("cannot read the key file " + file);
    add_lines(in);
  }
  if (const char* env = std::getenv(env_name)) {
    std::string all = env;
    std::replace(all.begin(), all.end(), ',', '\n');
    std::istringstream in(all);
    add_lines(in);
  }
  return keys;
}

}  // namespace

void add_graph_commands(CLI::App& app, std::function<int()>& run) {
  struct serve_opts {
    std::string model = "models/demo", topology = "local", host = "127.0.0.1", keys_file, admin_keys_file, name, chat_template;
    std::string device = "cpu";
    int port = 8080, threads = 0, http_threads = 2;
    int grace_s = 30;
    gateway::gateway_options gateway;
    speculation_setup speculation;  // applies when --draft is given (else the topology's)
  };
  auto so = std::make_shared<serve_opts>();
  auto* serve = app.add_subcommand("serve", "Serve a model: the actor graph behind an HTTP + WebSocket gateway");
  serve->add_option("--model", so->model, "model directory")->capture_default_str();
  serve->add_option("--topology", so->topology, "topology file, or 'local'")->capture_default_str();
  serve->add_option("--host", so->host, "address to listen on")->capture_default_str();
  serve->add_option("--port", so->port, "port to listen on (0: any free port)")->capture_default_str();
  serve->add_option("--name", so->name, "model name clients use (default: the model directory's name)");
  serve->add_option("--api-keys-file", so->keys_file,
                    "file of API keys, one per line; with keys (or TROUPE_API_KEYS=k1,k2) every endpoint but /health "
                    "needs 'Authorization: Bearer KEY'");
  serve->add_option("--chat-template", so->chat_template,
                    "chat template JSON {\"message\": \"<|{role}|>\\n{content}\\n\", \"generation_prompt\": ...}; "
                    "default: the model's chat_template.json, else that built-in format")
      ->check(CLI::ExistingFile);
  serve->add_option("--admin-keys-file", so->admin_keys_file,
                    "file of admin keys (or TROUPE_ADMIN_KEYS=k1,k2): enables /admin/draft for `troupe draft` (hot swap)");
  serve->add_option("--draft", so->speculation.draft,
                    "speculative decoding with this draft model directory (same tokenizer), e.g. models/demo-draft; "
                    "overrides the topology's \"speculation\" section");
  serve->add_option("--draft-tokens", so->speculation.policy.draft_tokens, "tokens drafted per step by default (a request's "
                    "\"draft_tokens\" overrides it)")->capture_default_str();
  serve->add_option("--draft-max-tokens", so->speculation.max_draft_tokens, "the most draft tokens a request may ask for")
      ->capture_default_str();
  serve->add_option("--draft-min-acceptance", so->speculation.policy.min_acceptance_length,
                    "a request stops drafting when fewer drafts than this are accepted per round (over --draft-window rounds)")
      ->capture_default_str();
  serve->add_option("--draft-window", so->speculation.policy.window, "rounds averaged for that decision")->capture_default_str();
  serve->add_option("--draft-retry-after", so->speculation.policy.retry_after,
                    "plain steps before drafting again (doubling after each failed retry; 0: never switch off)")
      ->capture_default_str();
  serve->add_option("--draft-max-batch", so->speculation.policy.max_batch,
                    "no drafting in steps of more sequences than this (0: no cutoff)")->capture_default_str();
  serve->add_option("--threads", so->threads, "compute threads; 0 = all cores")->capture_default_str();
  serve->add_option("--device", so->device,
                    "cpu, or cuda[:N] where the CUDA backend is built: every actor of the graph computes there "
                    "(remote edges need cpu)")
      ->capture_default_str();
  serve->add_option("--http-threads", so->http_threads, "gateway I/O threads")->capture_default_str();
  serve->add_option("--max-tokens-limit", so->gateway.limits.max_tokens, "largest max_tokens a request may ask")
      ->capture_default_str();
  serve->add_option("--max-connections", so->gateway.max_connections, "open connections at most")->capture_default_str();
  serve->add_option("--max-requests", so->gateway.max_requests_total, "requests in flight at most")->capture_default_str();
  serve->add_option("--shutdown-grace", so->grace_s, "on SIGTERM, seconds to let requests in flight finish")
      ->capture_default_str();
  serve->callback([&run, so] {
    run = [so] {
      const stop_signals signals;
      caf::actor_system_config cfg;
      auto sys = make_system(cfg);
      auto compute = load_compute(so->model, so->threads, so->device);
      const auto& config = compute->net->config();
      auto tok = std::make_shared<const tokenizer>(tokenizer::load(std::filesystem::path(so->model) / "tokenizer.json"));
      auto topo = topology_for(so->topology, config);
      if (!so->speculation.draft.empty()) {
        validate_speculation(so->speculation);
        topo.speculation = so->speculation;
      }
      auto graph = inference_graph::start(*sys, compute, topo);
      auto opt = so->gateway;
      opt.host = so->host;
      opt.port = static_cast<std::uint16_t>(so->port);
      opt.threads = so->http_threads;
      opt.model_name = so->name.empty() ? std::filesystem::path(so->model).filename().string() : so->name;
      opt.api_keys = read_keys(so->keys_file, "TROUPE_API_KEYS");
      opt.admin_keys = read_keys(so->admin_keys_file, "TROUPE_ADMIN_KEYS");
      const auto model_template = std::filesystem::path(so->model) / "chat_template.json";
      if (!so->chat_template.empty()) opt.chat = gateway::chat_template::load(so->chat_template);
      else if (std::filesystem::exists(model_template)) opt.chat = gateway::chat_template::load(model_template.string());
      gateway::gateway_server server(*sys, caf::actor_cast<caf::actor>(graph.scheduler), tok, config, opt);
      if (graph.draft) server.set_draft(caf::actor_cast<caf::actor>(graph.draft));
      server.start();
      if (graph.draft)
        std::cerr << "[serve] speculative decoding with draft " << topo.speculation.draft << " (k = "
                  << topo.speculation.policy.draft_tokens << ")"
                  << (opt.admin_keys.empty() ? "" : "; hot swap: build/troupe draft load DIR --port " + std::to_string(server.port()))
                  << std::endl;
      std::cerr << "[serve] model '" << opt.model_name << "' (" << so->model << "), topology " << so->topology
                << ", listening on http://" << opt.host << ":" << server.port()
                << (opt.api_keys.empty() ? "" : " (API keys required)") << "\n"
                << "[serve] try: curl -s http://" << opt.host << ":" << server.port()
                << "/v1/completions -d '{\"prompt\": \"In the beginning\", \"max_tokens\": 32}'\n"
                << "[serve]  or: build/troupe chat --port " << server.port() << "   (WebSocket /v1/stream)" << std::endl;
      signals.wait();
      server.stop_accepting();
      std::cerr << "[serve] stopping: no new connections; " << server.requests_in_flight()
                << " request(s) in flight get " << so->grace_s << " s to finish" << std::endl;
      const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(so->grace_s);
      while (server.requests_in_flight() > 0 && std::chrono::steady_clock::now() < deadline)
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
      const auto left = server.requests_in_flight();
      server.stop();
      graph.stop(*sys);
      std::cerr << "[serve] stopped" << (left ? " (" + std::to_string(left) + " request(s) cut off)" : "") << std::endl;
      return 0;
    };
  });

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
      const stop_signals signals;
      caf::actor_system_config cfg;
      auto sys = make_system(cfg);
      auto compute = load_compute(o->model, o->threads);
      const auto topo = topology_for(o->topology, compute->net->config());
      auto shards = host_expert_shards(*sys, compute, topo, o->shards, o->host, static_cast<std::uint16_t>(o->port));
      std::cerr << "[expert-host] serving " << shards.size() << " shard(s) on " << o->host << ":" << o->port
                << (shards.size() > 1 ? "+" : "") << "; SIGTERM or SIGINT stops" << std::endl;
      signals.wait();
      for (const auto& s : shards) caf::anon_send_exit(s, caf::exit_reason::user_shutdown);
      std::cerr << "[expert-host] stopped\n";
      return 0;
    };
  });
}

}  // namespace troupe::cli

namespace troupe::cli {

int chat_client(const std::string& host, int port, const std::string& key, const generation_params& params);

void add_chat_command(CLI::App& app, std::function<int()>& run) {
  struct chat_opts {
    std::string host = "127.0.0.1", key;
    int port = 8080;
    generation_params params;
  };
  auto o = std::make_shared<chat_opts>();
  o->params.max_tokens = 128;
  o->params.sampling.temperature = 0.8f;
  auto* cmd = app.add_subcommand("chat", "Chat with a running `troupe serve` over its WebSocket, streaming replies");
  cmd->add_option("--host", o->host, "server address")->capture_default_str();
  cmd->add_option("--port", o->port, "server port")->capture_default_str();
  cmd->add_option("--api-key", o->key, "API key (or TROUPE_API_KEY)");
  cmd->add_option("--max-tokens", o->params.max_tokens, "most tokens per reply")->capture_default_str();
  cmd->add_option("--temperature", o->params.sampling.temperature, "sampling temperature")->capture_default_str();
  cmd->callback([&run, o] {
    run = [o] {
      std::string key = o->key;
      if (key.empty())
        if (const char* env = std::getenv("TROUPE_API_KEY")) key = env;
      return chat_client(o->host, o->port, key, o->params);
    };
  });
}

}  // namespace troupe::cli
