// Turning client JSON into generation requests, for both the WebSocket protocol
// (docs/PROTOCOL.md) and the OpenAI-compatible HTTP endpoints. Pure functions (no sockets, no
// actors) so they are unit-tested and fuzzed directly.
// Invariant: any byte string either parses into a fully validated request or yields a
// parse_error whose message says what is wrong; nothing else escapes.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "model/sampler.hpp"

namespace troupe::gateway {

/// Limits the parser enforces (the gateway's configuration).
struct request_limits {
  std::int32_t max_tokens = 4096;       // per request
  std::int32_t default_max_tokens = 256;
  std::size_t max_stop_strings = 8;
  std::size_t max_stop_length = 128;
  std::size_t max_prompt_bytes = 1 << 20;
};

struct chat_message {
  std::string role, content;
};

/// What a client asked for; the prompt is text or chat messages (rendered by a chat template).
struct parsed_generate {
  std::string id;                          // client id (WebSocket) or generated (HTTP)
  std::optional<std::string> prompt;
  std::vector<chat_message> messages;
  sampling_params sampling;
  std::int32_t max_tokens = 256;
  std::int32_t draft_tokens = -1;          // speculation per step (-1: the server's default, 0: off)
  std::vector<std::string> stop;
  bool stream = false;                     // HTTP: server-sent events
  std::string model;                       // HTTP: the model field (checked against the served one)
};

enum class ws_op : std::uint8_t { generate, cancel, ping };

struct ws_request {
  ws_op op = ws_op::ping;
  parsed_generate generate;  // op == generate
  std::string id;            // op == cancel (and generate)
};

/// A client error: `message` is safe to send back as is.
struct parse_error {
  std::string message;
};

/// A WebSocket text frame: {"op": "generate" | "cancel" | "ping", ...}.
std::variant<ws_request, parse_error> parse_ws_request(std::string_view frame, const request_limits& limits);
/// POST /v1/completions (chat = false) or /v1/chat/completions (chat = true).
std::variant<parsed_generate, parse_error> parse_openai_request(std::string_view body, bool chat,
                                                                const request_limits& limits);
/// Whether `text` is valid UTF-8.
bool valid_utf8(std::string_view text);

}  // namespace troupe::gateway
