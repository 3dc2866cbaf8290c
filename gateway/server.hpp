// The gateway: Boost.Beast HTTP and WebSocket server in front of the scheduler actor.
//   GET /health, GET /v1/models, GET /metrics (Prometheus), POST /v1/completions,
//   POST /v1/chat/completions (OpenAI-compatible, `stream: true` as server-sent events),
//   WebSocket /v1/stream (docs/PROTOCOL.md); with an admin key and a speculative graph,
//   GET /admin/draft, POST /admin/draft {"model": DIR}, POST /admin/draft/rollback.
// Invariants: bad input never disturbs other clients and always gets an answer saying what was
// wrong; every queue is bounded (connections, requests in flight, each client's send buffer);
// a client that disappears has its requests cancelled.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "gateway/request_parser.hpp"

#include <caf/fwd.hpp>

namespace troupe {
class tokenizer;
struct model_config;
}  // namespace troupe

namespace troupe::gateway {

/// Renders chat messages into a prompt: each message through `message` ({role}, {content}),
/// then `generation_prompt`.
struct chat_template {
  std::string message = "<|{role}|>\n{content}\n";
  std::string generation_prompt = "<|assistant|>\n";
  std::string render(const std::vector<chat_message>& messages) const;
  /// Reads {"message": "...", "generation_prompt": "..."} (a model directory's
  /// chat_template.json, or a file named on the command line); throws input_error naming it.
  static chat_template load(const std::string& path);
};

struct gateway_options {
  std::string host = "127.0.0.1";
  std::uint16_t port = 8080;  // 0: any free port (see gateway_server::port())
  int threads = 2;
  std::string model_name = "troupe";
  request_limits limits;
  std::size_t max_connections = 1024;
  std::size_t max_requests_per_connection = 16;
  std::size_t max_requests_total = 1024;
  std::size_t max_frame_bytes = 1 << 20;     // WebSocket frames (close 1009 beyond)
  std::size_t max_body_bytes = 4 << 20;      // HTTP bodies (413 beyond)
  std::size_t send_buffer_bytes = 8 << 20;   // per client; a slower reader is dropped
  std::chrono::seconds idle_timeout{300};
  std::vector<std::string> api_keys;         // empty: no authentication
  std::vector<std::string> admin_keys;       // empty: the admin endpoints are disabled
  chat_template chat;
};

class gateway_server {
 public:
  /// `scheduler` is the graph's scheduler_actor (untyped here to keep CAF out of this header).
  gateway_server(caf::actor_system& sys, const caf::actor& scheduler, std::shared_ptr<const tokenizer> tok,
                 const model_config& config, gateway_options options);
  ~gateway_server();

  /// The graph's draft_actor, for the admin endpoints (call before start()).
  void set_draft(const caf::actor& draft);
  /// Binds and starts accepting; throws input_error when the address cannot be bound.
  void start();
  std::uint16_t port() const;
  /// Stops accepting; requests in flight continue.
  void stop_accepting();
  /// Requests in flight (HTTP and WebSocket).
  std::size_t requests_in_flight() const;
  /// Closes every connection and stops the server threads.
  void stop();

  struct impl;  // the sessions (server.cpp) share it

 private:
  std::shared_ptr<impl> impl_;
};

}  // namespace troupe::gateway
