// `troupe chat`: a terminal client for the WebSocket protocol (docs/PROTOCOL.md). Each line
// typed is a user message; the conversation so far goes with it, and the reply streams back.
#include <boost/asio/connect.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/websocket.hpp>
#include <simdjson.h>

#include <iostream>

#include "model/generator.hpp"
#include "protocol/errors.hpp"
#include "protocol/json_writer.hpp"

namespace troupe::cli {

namespace beast = boost::beast;
namespace websocket = beast::websocket;
namespace net = boost::asio;

int chat_client(const std::string& host, int port, const std::string& key, const generation_params& params) {
  net::io_context ioc;
  websocket::stream<net::ip::tcp::socket> ws{ioc};
  try {
    net::ip::tcp::resolver resolver{ioc};
    net::connect(ws.next_layer(), resolver.resolve(host, std::to_string(port)));
    if (!key.empty())
      ws.set_option(websocket::stream_base::decorator(
          [key](websocket::request_type& req) { req.set(beast::http::field::authorization, "Bearer " + key); }));
    ws.handshake(host, "/v1/stream");
  } catch (const std::exception& e) {
    throw input_error("cannot connect to ws://" + host + ":" + std::to_string(port) + "/v1/stream: " + e.what());
  }
  std::cerr << "[chat] connected to " << host << ":" << port << "; type a message, an empty line or Ctrl-D ends\n";
  std::vector<std::pair<std::string, std::string>> history;  // role, content
  simdjson::dom::parser parser;
  for (int turn = 1;; ++turn) {
    std::cout << "> " << std::flush;
    std::string line;
    if (!std::getline(std::cin, line) || line.empty()) break;
    history.emplace_back("user", line);
    json_writer w;
    w.begin_object().key("op").value("generate").key("id").value("turn" + std::to_string(turn));
    w.key("messages").begin_array();
    for (const auto& [role, content] : history) w.begin_object().key("role").value(role).key("content").value(content).end_object();
    w.end_array();
    w.key("max_tokens").value(params.max_tokens).key("temperature").value(static_cast<double>(params.sampling.temperature));
    w.end_object();
    ws.write(net::buffer(w.str()));
    std::string reply;
    for (bool done = false; !done;) {
      beast::flat_buffer buffer;
      ws.read(buffer);
      simdjson::padded_string text(beast::buffers_to_string(buffer.data()));
      simdjson::dom::element event;
      if (parser.parse(text).get(event)) continue;
      std::string_view kind, piece;
      if (event["event"].get_string().get(kind)) continue;
      if (kind == "token" && !event["text"].get_string().get(piece)) {
        std::cout << piece << std::flush;
        reply += piece;
      } else if (kind == "done") {
        std::cout << "\n";
        done = true;
      } else if (kind == "error") {
        std::string_view message = "(no message)";
        if (event["message"].get_string().get(message)) message = "(no message)";
        std::cout << "\n[chat] error: " << message << "\n";
        done = true;
      }
    }
    history.emplace_back("assistant", reply);
  }
  beast::error_code ec;
  ws.close(websocket::close_code::normal, ec);
  return 0;
}

}  // namespace troupe::cli
