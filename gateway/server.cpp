#include "gateway/server.hpp"

#include <boost/asio/dispatch.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/strand.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/websocket.hpp>
#include <caf/actor_system.hpp>
#include <caf/scoped_actor.hpp>
#include <caf/send.hpp>
#include <simdjson.h>

#include <atomic>
#include <deque>
#include <iostream>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <shared_mutex>
#include <thread>
#include <unordered_map>

#include "gateway/draft_admin.hpp"
#include "gateway/metrics.hpp"
#include "gateway/relay.hpp"
#include "model/config.hpp"
#include "protocol/errors.hpp"
#include "protocol/interfaces.hpp"
#include "protocol/json_writer.hpp"
#include "tokenizer/tokenizer.hpp"

namespace troupe::gateway {

namespace beast = boost::beast;
namespace http = beast::http;
namespace websocket = beast::websocket;
namespace net = boost::asio;
using tcp = net::ip::tcp;

std::string chat_template::render(const std::vector<chat_message>& messages) const {
  std::string out;
  for (const auto& m : messages) {
    std::string part = message;
    for (const auto& [key, value] : {std::pair<std::string, std::string>{"{role}", m.role}, {"{content}", m.content}}) {
      for (auto pos = part.find(key); pos != std::string::npos; pos = part.find(key, pos + value.size()))
        part.replace(pos, key.size(), value);
    }
    out += part;
  }
  return out + generation_prompt;
}

chat_template chat_template::load(const std::string& path) {
  simdjson::dom::parser parser;
  simdjson::padded_string text;
  if (simdjson::padded_string::load(path).get(text)) throw input_error(path + ": cannot read the chat template");
  simdjson::dom::object o;
  if (parser.parse(text).get_object().get(o)) throw input_error(path + ": the chat template must be a JSON object");
  chat_template t;
  std::string_view message, prompt;
  if (o["message"].get_string().get(message))
    throw input_error(path + ": field 'message' (a string with {role} and {content}) is required");
  if (message.find("{content}") == std::string_view::npos)
    throw input_error(path + ": field 'message' must contain {content}");
  t.message = std::string(message);
  if (!o["generation_prompt"].get_string().get(prompt)) t.generation_prompt = std::string(prompt);
  return t;
}

namespace {

std::string error_json(const std::string& message, const std::string& type, const std::string& id = {}) {
  json_writer w;
  w.begin_object();
  if (!id.empty()) w.key("id").value(id);
  w.key("error").begin_object().key("message").value(message).key("type").value(type).end_object();
  w.end_object();
  return w.str();
}

// A request's speculation figures inside its usage object (only when it drafted).
void write_speculation(json_writer& w, const request_done& d) {
  if (d.draft_rounds == 0) return;
  w.key("speculation").begin_object().key("rounds").value(d.draft_rounds).key("drafted_tokens").value(d.drafted_tokens);
  w.key("accepted_tokens").value(d.accepted_tokens);
  w.key("acceptance_length").value(static_cast<double>(d.accepted_tokens) / static_cast<double>(d.draft_rounds));
  w.key("acceptance_rate").value(d.drafted_tokens ? static_cast<double>(d.accepted_tokens) / static_cast<double>(d.drafted_tokens) : 0.0);
  w.end_object();
}

}  // namespace

struct gateway_server::impl : std::enable_shared_from_this<impl> {
  caf::actor_system& sys;
  caf::actor scheduler;
  caf::actor draft;  // invalid unless the graph speculates
  std::shared_ptr<const tokenizer> tok;
  std::int32_t eos;
  std::int64_t max_context;
  gateway_options opt;
  std::shared_ptr<gateway_metrics> metrics = std::make_shared<gateway_metrics>();
  // Pending handlers hold the impl (shared_from_this), so the impl cannot own the I/O context
  // outright: release_io() destroys it (and with it those handlers) once the threads are joined.
  std::unique_ptr<net::io_context> io;
  net::io_context& ioc;
  std::shared_mutex io_mutex;  // post_to() against release_io()
  // Sessions waiting on a relay with no I/O pending (an HTTP request being generated) are kept
  // here rather than by the relay, so release_io() can drop them before the I/O context.
  std::mutex held_mutex;
  std::map<const void*, std::shared_ptr<void>> held;
  // Keeps the I/O threads running while no operation is pending (a stream between two tokens
  // has nothing outstanding once the acceptor is closed).
  std::optional<net::executor_work_guard<net::io_context::executor_type>> work{ioc.get_executor()};
  std::optional<tcp::acceptor> acceptor{std::in_place, ioc};
  std::vector<std::thread> threads;
  std::atomic<std::size_t> connections{0}, in_flight{0};
  std::atomic<std::uint64_t> next_id{1};
  std::atomic<bool> accepting{false};

  impl(caf::actor_system& s, caf::actor sched, std::shared_ptr<const tokenizer> t, const model_config& config,
       gateway_options o)
      : sys(s), scheduler(std::move(sched)), tok(std::move(t)), eos(config.eos_token_id),
        max_context(config.max_position_embeddings), opt(std::move(o)),
        io(std::make_unique<net::io_context>(std::max(1, opt.threads))), ioc(*io) {}

  // Destroys the sockets and the handlers still queued; called with the I/O threads stopped.
  void release_io() {
    std::unique_lock lock(io_mutex);
    std::map<const void*, std::shared_ptr<void>> drop;
    {
      std::lock_guard held_lock(held_mutex);
      drop.swap(held);
    }
    drop.clear();  // while the I/O context still exists
    work.reset();
    acceptor.reset();
    io.reset();
  }

  static bool has_key(const http::request<http::string_body>& req, const std::vector<std::string>& keys) {
    const auto h = req[http::field::authorization];
    if (h.size() < 7 || h.substr(0, 7) != "Bearer ") return false;
    const auto key = h.substr(7);
    for (const auto& k : keys)
      if (key == k) return true;
    return false;
  }
  bool authorized(const http::request<http::string_body>& req) const { return opt.api_keys.empty() || has_key(req, opt.api_keys); }
  bool admin(const http::request<http::string_body>& req) const { return !opt.admin_keys.empty() && has_key(req, opt.admin_keys); }

  // Validates and tokenizes a parsed request into a scheduler request; error text on failure.
  std::string prepare(const parsed_generate& g, const std::string& global_id, generate_request& out) const {
    const std::string prompt = g.prompt ? *g.prompt : opt.chat.render(g.messages);
    out.id = global_id;
    out.prompt = tok->encode(prompt, special_tokens::parse);
    if (out.prompt.empty()) return "the prompt is empty";
    out.sampling = g.sampling;
    out.max_tokens = g.max_tokens;
    out.draft_tokens = g.draft_tokens;
    out.stop_on_eos = true;
    if (max_context && static_cast<std::int64_t>(out.prompt.size()) + g.max_tokens > max_context)
      return "prompt of " + std::to_string(out.prompt.size()) + " tokens + max_tokens " + std::to_string(g.max_tokens) +
             " exceeds the context length " + std::to_string(max_context);
    return {};
  }

  scheduler_metrics scheduler_state() {
    scheduler_metrics m;
    caf::scoped_actor self{sys};
    self->request(caf::actor_cast<scheduler_actor>(scheduler), std::chrono::seconds(5), metrics_atom::value)
        .receive([&](scheduler_metrics& r) { m = r; }, [](caf::error&) {});
    return m;
  }

  void accept();

  void hold(std::shared_ptr<void> session) {
    std::lock_guard lock(held_mutex);
    held.emplace(session.get(), std::move(session));
  }
  void release(const void* session) {
    std::shared_ptr<void> last;  // destroyed outside the lock
    std::lock_guard lock(held_mutex);
    if (auto it = held.find(session); it != held.end()) {
      last = std::move(it->second);
      held.erase(it);
    }
  }

  // Runs work(session) on the session's I/O executor; called from relay (CAF) threads. Relays
  // hold sessions weakly, so no session (and none of its sockets) outlives the I/O context.
  template <class Session, class Work>
  void post_to(const std::weak_ptr<Session>& weak, Work work) {
    std::shared_lock lock(io_mutex);
    if (!io) return;
    auto self = weak.lock();
    if (!self) return;
    net::post(self->executor(), [self, work = std::move(work)]() mutable { work(*self); });
  }
};

namespace {

using request_t = http::request<http::string_body>;

// ---- WebSocket sessions -------------------------------------------------------------------

class ws_session : public std::enable_shared_from_this<ws_session> {
 public:
  ws_session(std::shared_ptr<gateway_server::impl> server, tcp::socket socket)
      : server_(std::move(server)), ws_(std::move(socket)), conn_(server_->next_id++) {}

  auto executor() { return ws_.get_executor(); }

  void run(request_t req) {
    ws_.read_message_max(0);  // enforced in on_read, so the close (1009) is a clean handshake
    websocket::stream_base::timeout t = websocket::stream_base::timeout::suggested(beast::role_type::server);
    t.idle_timeout = server_->opt.idle_timeout;
    ws_.set_option(t);
    ws_.async_accept(req, beast::bind_front_handler(&ws_session::on_accept, shared_from_this()));
  }

  ~ws_session() {
    cancel_all();
    server_->in_flight -= active_.size();
    server_->connections--;
    server_->metrics->connection_closed();
  }

 private:
  std::string global(const std::string& id) const { return "ws" + std::to_string(conn_) + "/" + id; }

  void on_accept(beast::error_code ec) {
    if (ec) return;
    read();
  }

  void read() {
    ws_.async_read_some(buffer_, 64 * 1024, beast::bind_front_handler(&ws_session::on_read, shared_from_this()));
  }

  // The client is gone (closed, dropped, sent a bad frame): its requests stop now, not when
  // they would have finished.
  void cancel_all() {
    for (const auto& [id, relay] : active_) {
      if (!cancelled_on_close_.insert(id).second) continue;
      (void)relay;
      caf::anon_send(caf::actor_cast<scheduler_actor>(server_->scheduler), cancel_atom::value, global(id));
    }
  }

  void on_read(beast::error_code ec, std::size_t) {
    if (ec) {
      closed_ = true;
      cancel_all();
      return;
    }
    if (closing_) {  // reading on until the client answers our close frame
      buffer_.consume(buffer_.size());
      return read();
    }
    if (buffer_.size() > server_->opt.max_frame_bytes) {
      closing_ = true;
      buffer_.consume(buffer_.size());
      cancel_all();
      // One write at a time: drop what is queued behind a write in progress, close after it.
      while (queue_.size() > 1) queue_.pop_back();
      if (queue_.empty()) close_too_big();
      return read();
    }
    if (!ws_.is_message_done()) return read();
    const std::string frame = beast::buffers_to_string(buffer_.data());
    buffer_.consume(buffer_.size());
    handle(frame);
    read();
  }

  void handle(const std::string& frame) {
    auto parsed = parse_ws_request(frame, server_->opt.limits);
    if (auto* err = std::get_if<parse_error>(&parsed)) return send_error({}, err->message);
    auto& r = std::get<ws_request>(parsed);
    if (r.op == ws_op::ping) return send("{\"event\":\"pong\"}");
    if (r.op == ws_op::cancel) {
      if (!active_.count(r.id)) return send_error(r.id, "no request with id '" + r.id + "' is in flight");
      caf::anon_send(caf::actor_cast<scheduler_actor>(server_->scheduler), cancel_atom::value, global(r.id));
      return;
    }
    if (active_.count(r.id)) return send_error(r.id, "a request with id '" + r.id + "' is already in flight");
    if (active_.size() >= server_->opt.max_requests_per_connection)
      return send_error(r.id, "too many requests in flight on this connection (limit " +
                                  std::to_string(server_->opt.max_requests_per_connection) + ")");
    if (server_->in_flight >= server_->opt.max_requests_total)
      return send_error(r.id, "the server is at its request limit; retry later");
    generate_request req;
    if (auto e = server_->prepare(r.generate, global(r.id), req); !e.empty()) return send_error(r.id, e);
    ++server_->in_flight;
    const std::weak_ptr<ws_session> weak = weak_from_this();
    const auto srv = server_;
    const std::string id = r.id;
    relay_events events;
    events.on_token = [srv, weak, id](const std::string& text, std::int32_t token) {
      json_writer w;
      w.begin_object().key("event").value("token").key("id").value(id).key("text").value(text);
      if (token >= 0) w.key("token").value(token);
      w.end_object();
      srv->post_to(weak, [s = w.str()](ws_session& self) { self.send(s); });
    };
    events.on_done = [srv, weak, id](const std::string& reason, const request_done& d) {
      json_writer w;
      w.begin_object().key("event").value(reason == "error" ? "error" : "done").key("id").value(id);
      if (reason == "error") {
        w.key("message").value(d.error);
      } else {
        w.key("finish_reason").value(reason);
        w.key("usage").begin_object().key("prompt_tokens").value(d.prompt_tokens);
        w.key("completion_tokens").value(d.completion_tokens);
        write_speculation(w, d);
        w.end_object();
        w.key("timings").begin_object().key("time_to_first_token_s").value(d.time_to_first_token_s);
        w.key("total_s").value(d.total_s).end_object();
      }
      w.end_object();
      srv->post_to(weak, [id, s = w.str()](ws_session& self) {
        self.finish(id);
        self.send(s);
      });
    };
    auto refused = [srv, weak, id](const std::string& why) {
      srv->post_to(weak, [id, why](ws_session& self) {
        self.finish(id);
        self.send_error(id, why);
      });
    };
    active_[id] = start_relay(server_->sys, server_->scheduler, server_->tok, std::move(req), r.generate.stop,
                              server_->eos, server_->metrics, std::move(events), std::move(refused));
  }

  void close_too_big() {
    ws_.async_close(websocket::close_reason(websocket::close_code::too_big,
                                            "message exceeds " + std::to_string(server_->opt.max_frame_bytes) + " bytes"),
                    [self = shared_from_this()](beast::error_code) {});
  }

  void finish(const std::string& id) {
    if (active_.erase(id)) --server_->in_flight;
  }

  void send_error(const std::string& id, const std::string& message) {
    json_writer w;
    w.begin_object().key("event").value("error");
    if (!id.empty()) w.key("id").value(id);
    w.key("message").value(message).end_object();
    send(w.str());
  }

  // Bounded send queue: a reader slower than the stream is dropped, never buffered without limit.
  void send(std::string message) {
    if (closed_ || closing_) return;
    queued_bytes_ += message.size();
    if (queued_bytes_ > server_->opt.send_buffer_bytes) {  // a reader this slow is dropped
      closed_ = true;
      cancel_all();
      beast::get_lowest_layer(ws_).close();
      return;
    }
    queue_.push_back(std::move(message));
    if (queue_.size() == 1) write();
  }

  void write() {
    ws_.text(true);
    ws_.async_write(net::buffer(queue_.front()), beast::bind_front_handler(&ws_session::on_write, shared_from_this()));
  }

  void on_write(beast::error_code ec, std::size_t) {
    if (ec) {
      closed_ = true;
      return;
    }
    queued_bytes_ -= queue_.front().size();
    queue_.pop_front();
    if (closing_) return close_too_big();
    if (!queue_.empty()) write();
  }

  std::shared_ptr<gateway_server::impl> server_;
  websocket::stream<beast::tcp_stream> ws_;
  std::uint64_t conn_;
  beast::flat_buffer buffer_;
  std::deque<std::string> queue_;
  std::size_t queued_bytes_ = 0;
  bool closed_ = false;
  bool closing_ = false;  // we sent a close frame (message too big)
  std::unordered_map<std::string, caf::actor> active_;  // client id -> relay
  std::set<std::string> cancelled_on_close_;
};

// ---- HTTP sessions ------------------------------------------------------------------------

class http_session : public std::enable_shared_from_this<http_session> {
 public:
  http_session(std::shared_ptr<gateway_server::impl> server, tcp::socket socket)
      : server_(std::move(server)), stream_(std::move(socket)) {}

  auto executor() { return stream_.get_executor(); }

  ~http_session() {
    if (!upgraded_) {
      if (!relay_id_.empty() && !done_)
        caf::anon_send(caf::actor_cast<scheduler_actor>(server_->scheduler), cancel_atom::value, relay_id_);
      server_->connections--;
      server_->metrics->connection_closed();
    }
  }

  void run() { net::dispatch(stream_.get_executor(), beast::bind_front_handler(&http_session::read, shared_from_this())); }

 private:
  void read() {
    parser_.emplace();
    parser_->body_limit(server_->opt.max_body_bytes);
    stream_.expires_after(server_->opt.idle_timeout);
    http::async_read(stream_, buffer_, *parser_, beast::bind_front_handler(&http_session::on_read, shared_from_this()));
  }

  void on_read(beast::error_code ec, std::size_t) {
    if (ec == http::error::end_of_stream) return close();
    if (ec == http::error::body_limit)
      return reply(http::status::payload_too_large, error_json("the request body exceeds " +
                                                                   std::to_string(server_->opt.max_body_bytes) + " bytes",
                                                               "invalid_request_error"),
                   false);
    if (ec) return;
    request_t req = parser_->release();
    if (websocket::is_upgrade(req)) {
      if (req.target() != "/v1/stream")
        return reply(http::status::not_found, error_json("WebSocket endpoint is /v1/stream", "invalid_request_error"), false);
      if (!server_->authorized(req))
        return reply(http::status::unauthorized, error_json("missing or wrong API key", "authentication_error"), false);
      upgraded_ = true;
      std::make_shared<ws_session>(server_, stream_.release_socket())->run(std::move(req));
      return;
    }
    route(req);
  }

  void route(const request_t& req) {
    const std::string target(req.target());
    keep_alive_ = req.keep_alive();
    if (target == "/health" && req.method() == http::verb::get) return reply(http::status::ok, "{\"status\":\"ok\"}");
    if (target.starts_with("/admin/")) return admin(req, target);
    if (!server_->authorized(req))
      return reply(http::status::unauthorized, error_json("missing or wrong API key", "authentication_error"));
    if (target == "/v1/models" && req.method() == http::verb::get) {
      json_writer w;
      w.begin_object().key("object").value("list").key("data").begin_array();
      w.begin_object().key("id").value(server_->opt.model_name).key("object").value("model");
      w.key("owned_by").value("troupe").end_object();
      w.end_array().end_object();
      return reply(http::status::ok, w.str());
    }
    if (target == "/metrics" && req.method() == http::verb::get)
      return reply(http::status::ok, server_->metrics->render(server_->scheduler_state()), true,
                   "text/plain; version=0.0.4");
    const bool chat = target == "/v1/chat/completions";
    if ((chat || target == "/v1/completions") && req.method() == http::verb::post) return completion(req.body(), chat);
    if (target == "/v1/completions" || chat || target == "/health" || target == "/v1/models" || target == "/metrics")
      return reply(http::status::method_not_allowed, error_json("method not allowed", "invalid_request_error"));
    return reply(http::status::not_found, error_json("no endpoint " + target, "invalid_request_error"));
  }

  // The draft hot-swap endpoints: an admin key (not an API key) is required.
  void admin(const request_t& req, const std::string& target) {
    if (server_->opt.admin_keys.empty())
      return reply(http::status::forbidden, error_json("the admin endpoints are disabled (serve with --admin-keys-file)",
                                                       "permission_error"));
    if (!server_->admin(req))
      return reply(http::status::unauthorized, error_json("missing or wrong admin key", "authentication_error"));
    draft_op op;
    std::string dir;
    if (target == "/admin/draft" && req.method() == http::verb::get) {
      op = draft_op::info;
    } else if (target == "/admin/draft/rollback" && req.method() == http::verb::post) {
      op = draft_op::rollback;
    } else if (target == "/admin/draft" && req.method() == http::verb::post) {
      op = draft_op::load;
      simdjson::dom::parser parser;
      simdjson::padded_string body(req.body());
      std::string_view model;
      simdjson::dom::object o;
      if (parser.parse(body).get_object().get(o) || o["model"].get_string().get(model) || model.empty())
        return reply(http::status::bad_request,
                     error_json("the body must be a JSON object {\"model\": \"DRAFT_DIRECTORY\"}", "invalid_request_error"));
      dir = std::string(model);
    } else {
      return reply(http::status::not_found, error_json("no admin endpoint " + target + " for this method "
                                                       "(GET /admin/draft, POST /admin/draft, POST /admin/draft/rollback)",
                                                       "invalid_request_error"));
    }
    if (!server_->draft)
      return reply(http::status::conflict, error_json("this server does not speculate (no draft in its topology)",
                                                      "invalid_request_error"));
    const std::weak_ptr<http_session> weak = weak_from_this();
    const auto srv = server_;
    server_->hold(shared_from_this());
    ask_draft(server_->sys, server_->draft, op, dir, [srv, weak, op](bool ok, std::string answer) {
      srv->post_to(weak, [ok, op, answer = std::move(answer)](http_session& self) {
        self.server_->release(&self);
        if (!ok) return self.reply(http::status::unprocessable_entity, error_json(answer, "draft_error"));
        if (op == draft_op::info) return self.reply(http::status::ok, answer);
        json_writer w;
        w.begin_object().key("status").value("ok").key("message").value(answer).end_object();
        self.reply(http::status::ok, w.str());
      });
    });
  }

  void completion(const std::string& body, bool chat) {
    auto parsed = parse_openai_request(body, chat, server_->opt.limits);
    if (auto* err = std::get_if<parse_error>(&parsed))
      return reply(http::status::bad_request, error_json(err->message, "invalid_request_error"));
    auto g = std::get<parsed_generate>(std::move(parsed));
    if (!g.model.empty() && g.model != server_->opt.model_name)
      return reply(http::status::not_found, error_json("model '" + g.model + "' is not served here (serving '" +
                                                           server_->opt.model_name + "')",
                                                       "invalid_request_error"));
    if (server_->in_flight >= server_->opt.max_requests_total)
      return reply(http::status::too_many_requests, error_json("the server is at its request limit", "rate_limit_error"));
    const std::string id = (chat ? "chatcmpl-" : "cmpl-") + std::to_string(server_->next_id++);
    generate_request req;
    if (auto e = server_->prepare(g, id, req); !e.empty())
      return reply(http::status::bad_request, error_json(e, "invalid_request_error"));
    relay_id_ = id;
    chat_ = chat;
    stream_mode_ = g.stream;
    ++server_->in_flight;
    const std::weak_ptr<http_session> weak = weak_from_this();
    const auto srv = server_;
    if (stream_mode_) {
      // Server-sent events: the body is delimited by closing the connection.
      keep_alive_ = false;
      send_raw("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n");
    }
    relay_events events;
    events.on_token = [srv, weak](const std::string& text, std::int32_t) {
      srv->post_to(weak, [text](http_session& self) {
        if (self.stream_mode_) self.send_raw("data: " + self.chunk_json(text, {}) + "\n\n");
        else self.text_ += text;
      });
    };
    events.on_done = [srv, weak](const std::string& reason, const request_done& d) {
      srv->post_to(weak, [reason, d](http_session& self) { self.on_done(reason, d); });
    };
    auto refused = [srv, weak](const std::string& why) {
      srv->post_to(weak, [why](http_session& self) {
        self.server_->release(&self);
        self.done_ = true;
        --self.server_->in_flight;
        if (self.stream_mode_) {
          self.send_raw("data: " + error_json(why, "server_error") + "\n\ndata: [DONE]\n\n", true);
        } else {
          self.reply(http::status::service_unavailable, error_json(why, "server_error"));
        }
      });
    };
    server_->hold(shared_from_this());
    start_relay(server_->sys, server_->scheduler, server_->tok, std::move(req), g.stop, server_->eos, server_->metrics,
                std::move(events), std::move(refused));
  }

  std::string chunk_json(const std::string& text, const std::string& finish) const {
    json_writer w;
    w.begin_object().key("id").value(relay_id_);
    w.key("object").value(chat_ ? "chat.completion.chunk" : "text_completion");
    w.key("created").value(static_cast<std::int64_t>(std::time(nullptr)));
    w.key("model").value(server_->opt.model_name);
    w.key("choices").begin_array().begin_object().key("index").value(0);
    if (chat_) {
      w.key("delta").begin_object();
      if (!text.empty()) w.key("content").value(text);
      w.end_object();
    } else {
      w.key("text").value(text);
    }
    w.key("finish_reason");
    if (finish.empty()) w.null(); else w.value(finish);
    w.end_object().end_array().end_object();
    return w.str();
  }

  void on_done(const std::string& reason, const request_done& d) {
    server_->release(this);
    done_ = true;
    --server_->in_flight;
    const std::string finish = reason == "eos" ? "stop" : reason;  // OpenAI: stop or length
    if (reason == "error") {
      if (stream_mode_) return send_raw("data: " + error_json(d.error, "server_error") + "\n\ndata: [DONE]\n\n", true);
      return reply(http::status::internal_server_error, error_json(d.error, "server_error"));
    }
    if (stream_mode_) return send_raw("data: " + chunk_json({}, finish) + "\n\ndata: [DONE]\n\n", true);
    json_writer w;
    w.begin_object().key("id").value(relay_id_);
    w.key("object").value(chat_ ? "chat.completion" : "text_completion");
    w.key("created").value(static_cast<std::int64_t>(std::time(nullptr)));
    w.key("model").value(server_->opt.model_name);
    w.key("choices").begin_array().begin_object().key("index").value(0);
    if (chat_) w.key("message").begin_object().key("role").value("assistant").key("content").value(text_).end_object();
    else w.key("text").value(text_);
    w.key("finish_reason").value(finish).end_object().end_array();
    w.key("usage").begin_object().key("prompt_tokens").value(d.prompt_tokens);
    w.key("completion_tokens").value(d.completion_tokens);
    w.key("total_tokens").value(d.prompt_tokens + d.completion_tokens);
    write_speculation(w, d);
    w.end_object();
    w.end_object();
    reply(http::status::ok, w.str());
  }

  void reply(http::status status, std::string body, bool keep_alive = true, const char* type = "application/json") {
    auto res = std::make_shared<http::response<http::string_body>>(status, 11);
    res->set(http::field::server, "troupe");
    res->set(http::field::content_type, type);
    res->keep_alive(keep_alive && keep_alive_);
    res->body() = std::move(body);
    res->prepare_payload();
    http::async_write(stream_, *res, [self = shared_from_this(), res](beast::error_code ec, std::size_t) {
      if (ec || !res->keep_alive()) return self->close();
      self->read();
    });
  }

  // Streamed bytes, in order; `last` closes the connection after them.
  void send_raw(std::string bytes, bool last = false) {
    pending_.push_back({std::move(bytes), last});
    if (pending_.size() == 1) write_raw();
  }

  void write_raw() {
    net::async_write(stream_, net::buffer(pending_.front().first), [self = shared_from_this()](beast::error_code ec, std::size_t) {
      const bool last = self->pending_.front().second;
      self->pending_.pop_front();
      if (ec || last) return self->close();
      if (!self->pending_.empty()) self->write_raw();
    });
  }

  void close() {
    beast::error_code ec;
    stream_.socket().shutdown(tcp::socket::shutdown_send, ec);
  }

  std::shared_ptr<gateway_server::impl> server_;
  beast::tcp_stream stream_;
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::string_body>> parser_;
  bool keep_alive_ = true, upgraded_ = false, done_ = false, chat_ = false, stream_mode_ = false;
  std::string relay_id_, text_;
  std::deque<std::pair<std::string, bool>> pending_;
};

}  // namespace

void gateway_server::impl::accept() {
  acceptor->async_accept(net::make_strand(ioc), [self = shared_from_this()](beast::error_code ec, tcp::socket socket) {
    if (!self->accepting) return;
    if (!ec) {
      if (self->connections >= self->opt.max_connections) {
        static const std::string busy =
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: 52\r\n\r\n"
            "{\"error\":{\"message\":\"too many connections\",\"type\":\"x\"}}";
        beast::error_code ignored;
        net::write(socket, net::buffer(busy), ignored);
        socket.close(ignored);
      } else {
        ++self->connections;
        self->metrics->connection_opened();
        beast::error_code ignored;
        socket.set_option(tcp::no_delay(true), ignored);  // token events go out at once, not batched by Nagle
        std::make_shared<http_session>(self, std::move(socket))->run();
      }
    }
    self->accept();
  });
}

gateway_server::gateway_server(caf::actor_system& sys, const caf::actor& scheduler, std::shared_ptr<const tokenizer> tok,
                               const model_config& config, gateway_options options)
    : impl_(std::make_shared<impl>(sys, scheduler, std::move(tok), config, std::move(options))) {}

void gateway_server::set_draft(const caf::actor& draft) { impl_->draft = draft; }

gateway_server::~gateway_server() {
  stop();
  impl_->release_io();
}

void gateway_server::start() {
  auto& i = *impl_;
  beast::error_code ec;
  const tcp::endpoint ep{net::ip::make_address(i.opt.host, ec), i.opt.port};
  if (ec) throw input_error("gateway: '" + i.opt.host + "' is not an IP address");
  i.acceptor->open(ep.protocol(), ec);
  if (!ec) i.acceptor->set_option(net::socket_base::reuse_address(true), ec);
  if (!ec) i.acceptor->bind(ep, ec);
  if (!ec) i.acceptor->listen(net::socket_base::max_listen_connections, ec);
  if (ec) throw input_error("gateway: cannot listen on " + i.opt.host + ":" + std::to_string(i.opt.port) + ": " + ec.message());
  i.accepting = true;
  impl_->accept();
  for (int t = 0; t < std::max(1, i.opt.threads); ++t) i.threads.emplace_back([&i] { i.ioc.run(); });
}

std::uint16_t gateway_server::port() const { return impl_->acceptor->local_endpoint().port(); }

void gateway_server::stop_accepting() {
  impl_->accepting = false;
  net::post(impl_->ioc, [i = impl_] {
    beast::error_code ec;
    i->acceptor->close(ec);
  });
}

std::size_t gateway_server::requests_in_flight() const { return impl_->in_flight; }

void gateway_server::stop() {
  if (!impl_) return;
  stop_accepting();
  impl_->work.reset();
  impl_->ioc.stop();
  for (auto& t : impl_->threads)
    if (t.joinable()) t.join();
  impl_->threads.clear();
}

}  // namespace troupe::gateway
