#include "gateway/request_parser.hpp"

#include <simdjson.h>

#include <cmath>
#include <set>

namespace troupe::gateway {
namespace {

using simdjson::dom::element;
using simdjson::dom::object;

struct bad : std::exception {
  std::string message;
  explicit bad(std::string m) : message(std::move(m)) {}
};

std::string type_name(element e) {
  switch (e.type()) {
    case simdjson::dom::element_type::ARRAY: return "an array";
    case simdjson::dom::element_type::OBJECT: return "an object";
    case simdjson::dom::element_type::STRING: return "a string";
    case simdjson::dom::element_type::INT64:
    case simdjson::dom::element_type::UINT64: return "an integer";
    case simdjson::dom::element_type::DOUBLE: return "a number";
    case simdjson::dom::element_type::BOOL: return "a boolean";
    case simdjson::dom::element_type::NULL_VALUE: return "null";
  }
  return "a value";
}

double number(element e, std::string_view field) {
  if (e.is_int64()) return static_cast<double>(std::int64_t(e));
  if (e.is_uint64()) return static_cast<double>(std::uint64_t(e));
  double v;
  if (e.get_double().get(v)) throw bad("'" + std::string(field) + "' must be a number, got " + type_name(e));
  return v;
}

std::int64_t integer(element e, std::string_view field) {
  std::int64_t v;
  if (e.get_int64().get(v)) throw bad("'" + std::string(field) + "' must be an integer, got " + type_name(e));
  return v;
}

std::string string(element e, std::string_view field) {
  std::string_view v;
  if (e.get_string().get(v)) throw bad("'" + std::string(field) + "' must be a string, got " + type_name(e));
  return std::string(v);
}

bool boolean(element e, std::string_view field) {
  bool v;
  if (e.get_bool().get(v)) throw bad("'" + std::string(field) + "' must be true or false, got " + type_name(e));
  return v;
}

std::vector<chat_message> messages(element e) {
  simdjson::dom::array arr;
  if (e.get_array().get(arr) || arr.size() == 0) throw bad("'messages' must be a non-empty array of {role, content}");
  std::vector<chat_message> out;
  static const std::set<std::string> roles = {"system", "user", "assistant"};
  for (element m : arr) {
    object o;
    if (m.get_object().get(o)) throw bad("each message must be an object with 'role' and 'content'");
    element role, content;
    if (o["role"].get(role) || o["content"].get(content)) throw bad("each message needs 'role' and 'content'");
    chat_message cm{string(role, "role"), string(content, "content")};
    if (!roles.count(cm.role)) throw bad("message role '" + cm.role + "' is not system, user or assistant");
    out.push_back(std::move(cm));
  }
  return out;
}

std::vector<std::string> stop_strings(element e, const request_limits& limits) {
  std::vector<std::string> out;
  if (e.is_null()) return out;
  if (e.is_string()) {
    out.push_back(string(e, "stop"));
  } else {
    simdjson::dom::array arr;
    if (e.get_array().get(arr)) throw bad("'stop' must be a string or an array of strings");
    for (element s : arr) out.push_back(string(s, "stop"));
  }
  if (out.size() > limits.max_stop_strings)
    throw bad("'stop' has " + std::to_string(out.size()) + " strings; at most " + std::to_string(limits.max_stop_strings));
  for (const auto& s : out)
    if (s.empty() || s.size() > limits.max_stop_length)
      throw bad("stop strings must be 1 to " + std::to_string(limits.max_stop_length) + " bytes");
  return out;
}

// Sampling and length fields shared by every request kind. Returns false for a field it does
// not know (the caller decides whether that is an error).
bool common_field(std::string_view key, element value, parsed_generate& g, const request_limits& limits) {
  if (key == "max_tokens" || key == "max_completion_tokens") {
    const auto v = integer(value, key);
    if (v < 1 || v > limits.max_tokens)
      throw bad("'" + std::string(key) + "' must be between 1 and " + std::to_string(limits.max_tokens) + ", got " +
                std::to_string(v));
    g.max_tokens = static_cast<std::int32_t>(v);
  } else if (key == "draft_tokens") {
    const auto v = integer(value, key);
    if (v < 0 || v > 64) throw bad("'draft_tokens' must be between 0 and 64, got " + std::to_string(v));
    g.draft_tokens = static_cast<std::int32_t>(v);
  } else if (key == "temperature") {
    g.sampling.temperature = static_cast<float>(number(value, key));
  } else if (key == "top_p") {
    g.sampling.top_p = static_cast<float>(number(value, key));
  } else if (key == "top_k") {
    const auto v = integer(value, key);
    if (v < 0 || v > (1 << 30)) throw bad("'top_k' must be >= 0");
    g.sampling.top_k = static_cast<std::int32_t>(v);
  } else if (key == "repetition_penalty") {
    g.sampling.repetition_penalty = static_cast<float>(number(value, key));
  } else if (key == "seed") {
    if (!value.is_null()) g.sampling.seed = static_cast<std::uint64_t>(integer(value, key));
  } else if (key == "stop") {
    g.stop = stop_strings(value, limits);
  } else if (key == "prompt") {
    g.prompt = string(value, key);
    if (g.prompt->size() > limits.max_prompt_bytes)
      throw bad("'prompt' is " + std::to_string(g.prompt->size()) + " bytes; at most " + std::to_string(limits.max_prompt_bytes));
  } else if (key == "messages") {
    g.messages = messages(value);
  } else {
    return false;
  }
  return true;
}

void finish(parsed_generate& g) {
  if (g.prompt && !g.messages.empty()) throw bad("give either 'prompt' or 'messages', not both");
  if (!g.prompt && g.messages.empty()) throw bad("'prompt' or 'messages' is required");
  try {
    validate(g.sampling);
  } catch (const std::exception& e) {
    throw bad(e.what());
  }
}

element parse_object(simdjson::dom::parser& parser, const simdjson::padded_string& text, object& obj) {
  element doc;
  if (auto err = parser.parse(text).get(doc)) {
    if (err == simdjson::UTF8_ERROR) throw bad("the message is not valid UTF-8");
    throw bad(std::string("malformed JSON: ") + simdjson::error_message(err));
  }
  if (doc.get_object().get(obj)) throw bad("expected a JSON object, got " + type_name(doc));
  return doc;
}

}  // namespace

bool valid_utf8(std::string_view text) { return simdjson::validate_utf8(text.data(), text.size()); }

std::variant<ws_request, parse_error> parse_ws_request(std::string_view frame, const request_limits& limits) {
  try {
    simdjson::dom::parser parser;
    simdjson::padded_string text(frame);
    object obj;
    parse_object(parser, text, obj);
    element op_field;
    if (obj["op"].get(op_field)) throw bad("'op' is required (generate, cancel or ping)");
    const std::string op = string(op_field, "op");
    ws_request r;
    if (op == "ping") {
      r.op = ws_op::ping;
      for (auto [key, value] : obj)
        if (key != "op") throw bad("unknown field '" + std::string(key) + "' for ping");
      return r;
    }
    if (op != "generate" && op != "cancel") throw bad("unknown op '" + op + "' (generate, cancel or ping)");
    element id;
    if (obj["id"].get(id)) throw bad("'id' is required for " + op);
    r.id = string(id, "id");
    if (r.id.empty() || r.id.size() > 128) throw bad("'id' must be 1 to 128 characters");
    if (op == "cancel") {
      r.op = ws_op::cancel;
      for (auto [key, value] : obj)
        if (key != "op" && key != "id") throw bad("unknown field '" + std::string(key) + "' for cancel");
      return r;
    }
    r.op = ws_op::generate;
    auto& g = r.generate;
    g.id = r.id;
    g.max_tokens = limits.default_max_tokens;
    for (auto [key, value] : obj) {
      if (key == "op" || key == "id") continue;
      if (!common_field(key, value, g, limits)) throw bad("unknown field '" + std::string(key) + "' for generate");
    }
    finish(g);
    return r;
  } catch (const bad& e) {
    return parse_error{e.message};
  }
}

std::variant<parsed_generate, parse_error> parse_openai_request(std::string_view body, bool chat,
                                                                const request_limits& limits) {
  try {
    simdjson::dom::parser parser;
    simdjson::padded_string text(body);
    object obj;
    parse_object(parser, text, obj);
    parsed_generate g;
    g.max_tokens = limits.default_max_tokens;
    for (auto [key, value] : obj) {
      if (key == "prompt" && chat) throw bad("'prompt' belongs to /v1/completions; chat takes 'messages'");
      if (key == "messages" && !chat) throw bad("'messages' belongs to /v1/chat/completions");
      if (key == "prompt" && value.is_array()) {  // OpenAI allows a list: one prompt per request here
        simdjson::dom::array arr = value.get_array().value_unsafe();
        if (arr.size() != 1) throw bad("'prompt' as a list must hold exactly one string (one completion per request)");
        g.prompt = string(arr.at(0).value_unsafe(), "prompt");
        continue;
      }
      if (common_field(key, value, g, limits)) continue;
      if (key == "model") g.model = string(value, key);
      else if (key == "stream") g.stream = boolean(value, key);
      else if (key == "n" && integer(value, key) != 1) throw bad("'n' must be 1 (one choice per request)");
      else if ((key == "presence_penalty" || key == "frequency_penalty") && number(value, key) != 0)
        throw bad("'" + std::string(key) + "' is not supported (use repetition_penalty)");
      else if (key == "logprobs" && !value.is_null() && !(value.is_bool() && !bool(value)) &&
               !(value.is_int64() && std::int64_t(value) == 0))
        throw bad("'logprobs' is not supported");
      // Other OpenAI fields (user, stream_options, ...) are accepted and ignored, as elsewhere.
    }
    finish(g);
    return g;
  } catch (const bad& e) {
    return parse_error{e.message};
  }
}

}  // namespace troupe::gateway
