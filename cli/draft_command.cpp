// `troupe draft`: hot-swaps the speculative draft of a running `troupe serve` through its
// admin endpoints (an admin key, not an API key):
//   troupe draft load DIR    the draft in DIR takes over at the next step boundary
//   troupe draft rollback    back to the draft before the last swap
//   troupe draft status      the draft in use
#include <CLI/CLI.hpp>
#include <boost/asio/connect.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

#include <cstdlib>
#include <filesystem>
#include <iostream>

#include "cli/commands.hpp"
#include "protocol/errors.hpp"
#include "protocol/json_writer.hpp"

namespace troupe::cli {
namespace {

namespace beast = boost::beast;
namespace http = beast::http;
namespace net = boost::asio;

// One HTTP request to the server; returns (status, body).
std::pair<unsigned, std::string> call(const std::string& host, int port, const std::string& key, http::verb verb,
                                      const std::string& target, const std::string& body) {
  net::io_context ioc;
  beast::tcp_stream stream(ioc);
  try {
    net::ip::tcp::resolver resolver(ioc);
    stream.connect(resolver.resolve(host, std::to_string(port)));
  } catch (const std::exception& e) {
    throw input_error("cannot connect to http://" + host + ":" + std::to_string(port) + ": " + e.what());
  }
  http::request<http::string_body> req{verb, target, 11};
  req.set(http::field::host, host);
  req.set(http::field::authorization, "Bearer " + key);
  if (!body.empty()) {
    req.set(http::field::content_type, "application/json");
    req.body() = body;
  }
  req.prepare_payload();
  http::write(stream, req);
  beast::flat_buffer buffer;
  http::response<http::string_body> res;
  http::read(stream, buffer, res);
  beast::error_code ec;
  stream.socket().shutdown(net::ip::tcp::socket::shutdown_both, ec);
  return {res.result_int(), res.body()};
}

}  // namespace

void add_draft_command(CLI::App& app, std::function<int()>& run) {
  struct draft_opts {
    std::string host = "127.0.0.1", key, dir;
    int port = 8080;
  };
  auto o = std::make_shared<draft_opts>();
  auto* cmd = app.add_subcommand("draft", "Hot-swap the speculative draft model of a running `troupe serve`");
  cmd->require_subcommand(1);
  cmd->add_option("--host", o->host, "server address")->capture_default_str();
  cmd->add_option("--port", o->port, "server port")->capture_default_str();
  cmd->add_option("--admin-key", o->key, "admin key (or TROUPE_ADMIN_KEY); the server's --admin-keys-file lists them");
  auto* load = cmd->add_subcommand("load", "Load a draft checkpoint; it takes over at the next step boundary, no request is interrupted");
  load->add_option("dir", o->dir, "draft model directory, as the server sees it")->required();
  auto* rollback = cmd->add_subcommand("rollback", "Go back to the draft in use before the last swap (reloaded from its directory)");
  auto* status = cmd->add_subcommand("status", "Show the draft in use");
  for (auto* sub : {load, rollback, status}) sub->fallthrough();  // --port etc. may follow the action
  cmd->callback([&run, o, cmd] {
    run = [o, cmd] {
      std::string key = o->key;
      if (key.empty())
        if (const char* env = std::getenv("TROUPE_ADMIN_KEY")) key = env;
      if (key.empty()) throw input_error("an admin key is needed: --admin-key KEY or TROUPE_ADMIN_KEY");
      const std::string which = cmd->get_subcommands().front()->get_name();
      std::pair<unsigned, std::string> answer;
      if (which == "load") {
        // The server resolves the path; an absolute one means the same thing to both sides.
        const auto dir = std::filesystem::exists(o->dir) ? std::filesystem::absolute(o->dir).lexically_normal().string() : o->dir;
        json_writer w;
        w.begin_object().key("model").value(dir).end_object();
        std::cerr << "[draft] loading " << dir << " on " << o->host << ":" << o->port << " ..." << std::endl;
        answer = call(o->host, o->port, key, http::verb::post, "/admin/draft", w.str());
      } else if (which == "rollback") {
        answer = call(o->host, o->port, key, http::verb::post, "/admin/draft/rollback", "");
      } else {
        answer = call(o->host, o->port, key, http::verb::get, "/admin/draft", "");
      }
      std::cout << answer.second << std::endl;
      if (answer.first != 200) {
        std::cerr << "troupe: error: the server answered " << answer.first << std::endl;
        return 2;
      }
      return 0;
    };
  });
}

}  // namespace troupe::cli
