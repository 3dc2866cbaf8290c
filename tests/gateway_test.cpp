// The gateway over real sockets on loopback: every HTTP endpoint, the WebSocket protocol,
// and the bad inputs the issue lists, against a served model whose greedy output is known
// from the plain forward pass.
#include <gtest/gtest.h>

#include <boost/asio/connect.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/websocket.hpp>
#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/io/middleman.hpp>
#include <caf/scoped_actor.hpp>
#include <simdjson.h>

#include <malloc.h>

#include <fstream>

#include <atomic>
#include <numeric>
#include <set>
#include <thread>

#include "actors/compute.hpp"
#include "gateway/server.hpp"
#include "graph/inference_graph.hpp"
#include "model/generator.hpp"
#include "model/init_model.hpp"
#include "protocol/errors.hpp"
#include "protocol/json_writer.hpp"
#include "protocol/type_registry.hpp"
#include "tests/test_support.hpp"
#include "tokenizer/tokenizer.hpp"

namespace troupe {
namespace {

namespace beast = boost::beast;
namespace http = beast::http;
namespace websocket = beast::websocket;
namespace net = boost::asio;
using tcp = net::ip::tcp;

model_config demo_tiny() { return load_model_config(std::string(TROUPE_SOURCE_DIR) + "/configs/models/demo-tiny.json"); }

// A random model directory with the 4k tokenizer.
std::filesystem::path model_dir(const std::string& name, const model_config& config, std::uint64_t seed) {
  const auto d = test::temp_dir(name);
  init_options o;
  o.seed = seed;
  o.tokenizer_file = std::string(TROUPE_SOURCE_DIR) + "/configs/tokenizers/troupe-bpe-4k.json";
  init_model(config, d, o);
  return d;
}

struct served {
  caf::actor_system_config cfg;
  std::unique_ptr<caf::actor_system> sys;
  shared_compute compute;
  std::shared_ptr<const tokenizer> tok;
  inference_graph graph;
  std::unique_ptr<gateway::gateway_server> server;
  std::uint16_t port = 0;

  explicit served(gateway::gateway_options opt = {}, const std::string& topology_json = "{}") {
    add_message_types(cfg);
    cfg.load<caf::io::middleman>();
    sys = std::make_unique<caf::actor_system>(cfg);
    static const std::filesystem::path dir = model_dir("gateway_model", demo_tiny(), 3);
    compute = load_compute(dir.string(), 1);
    tok = std::make_shared<const tokenizer>(tokenizer::load(dir / "tokenizer.json"));
    graph = inference_graph::start(*sys, compute, parse_topology(topology_json, "test", compute->net->config()));
    opt.port = 0;
    opt.model_name = "demo";
    opt.limits.max_tokens = 64;
    server = std::make_unique<gateway::gateway_server>(*sys, caf::actor_cast<caf::actor>(graph.scheduler), tok,
                                                       compute->net->config(), opt);
    if (graph.draft) server->set_draft(caf::actor_cast<caf::actor>(graph.draft));
    server->start();
    port = server->port();
  }
  ~served() {
    server->stop();
    graph.stop(*sys);
  }

  std::string greedy(const std::string& prompt, int max_tokens) {
    generation_params p;
    p.sampling.temperature = 0;
    p.max_tokens = max_tokens;
    // As the gateway sends it: JSON text, so bytes that are not UTF-8 arrive as U+FFFD.
    return replace_invalid_utf8(generate(*compute->net, *tok, tok->encode(prompt, special_tokens::parse), p).text);
  }
};

struct http_reply {
  int status = 0;
  std::string body, content_type;
};

http_reply http_call(std::uint16_t port, http::verb verb, const std::string& target, const std::string& body = {},
                     const std::string& key = {}) {
  net::io_context ioc;
  beast::tcp_stream stream(ioc);
  stream.connect(tcp::endpoint(net::ip::make_address("127.0.0.1"), port));
  http::request<http::string_body> req{verb, target, 11};
  req.set(http::field::host, "127.0.0.1");
  if (!key.empty()) req.set(http::field::authorization, "Bearer " + key);
  if (!body.empty()) {
    req.set(http::field::content_type, "application/json");
    req.body() = body;
    req.prepare_payload();
  }
  beast::error_code write_ec;
  http::write(stream, req, write_ec);  // the server may answer (413) before reading a huge body
  beast::flat_buffer buffer;
  http::response_parser<http::string_body> parser;
  parser.body_limit(64 << 20);
  beast::error_code ec;
  http::read(stream, buffer, parser, ec);
  http_reply r;
  r.status = static_cast<int>(parser.get().result_int());
  r.body = parser.get().body();
  r.content_type = std::string(parser.get()[http::field::content_type]);
  return r;
}

std::string field(const std::string& json, const char* path) {
  simdjson::dom::parser p;
  simdjson::padded_string s(json);
  std::string_view v;
  if (p.parse(s).at_pointer(path).get_string().get(v)) return "<missing " + std::string(path) + ">";
  return std::string(v);
}

struct ws_client {
  net::io_context ioc;
  websocket::stream<tcp::socket> ws{ioc};
  ws_client(std::uint16_t port, const std::string& key = {}) {
    ws.next_layer().connect(tcp::endpoint(net::ip::make_address("127.0.0.1"), port));
    if (!key.empty())
      ws.set_option(websocket::stream_base::decorator(
          [key](websocket::request_type& req) { req.set(http::field::authorization, "Bearer " + key); }));
    ws.handshake("127.0.0.1", "/v1/stream");
  }
  void send(const std::string& s) { ws.write(net::buffer(s)); }
  std::string recv() {
    beast::flat_buffer b;
    ws.read(b);
    return beast::buffers_to_string(b.data());
  }
};

}  // namespace

TEST(gateway, http_endpoints_answer) {
  served s;
  auto health = http_call(s.port, http::verb::get, "/health");
  EXPECT_EQ(health.status, 200);
  EXPECT_EQ(health.body, "{\"status\":\"ok\"}");
  auto models = http_call(s.port, http::verb::get, "/v1/models");
  EXPECT_EQ(models.status, 200);
  EXPECT_EQ(field(models.body, "/data/0/id"), "demo");
  EXPECT_EQ(http_call(s.port, http::verb::get, "/nope").status, 404);
  EXPECT_EQ(http_call(s.port, http::verb::get, "/v1/completions").status, 405);
}

TEST(gateway, completions_match_the_plain_forward_pass) {
  served s;
  const std::string expected = s.greedy("In the beginning", 12);
  auto r = http_call(s.port, http::verb::post, "/v1/completions",
                     R"({"model": "demo", "prompt": "In the beginning", "max_tokens": 12, "temperature": 0})");
  ASSERT_EQ(r.status, 200) << r.body;
  EXPECT_EQ(field(r.body, "/object"), "text_completion");
  EXPECT_EQ(field(r.body, "/choices/0/text"), expected);
  EXPECT_EQ(field(r.body, "/choices/0/finish_reason"), "length");
  EXPECT_NE(r.body.find("\"completion_tokens\":12"), std::string::npos) << r.body;

  // The same request streamed as server-sent events gives the same text, then [DONE].
  auto sse = http_call(s.port, http::verb::post, "/v1/completions",
                       R"({"prompt": "In the beginning", "max_tokens": 12, "temperature": 0, "stream": true})");
  ASSERT_EQ(sse.status, 200);
  EXPECT_EQ(sse.content_type, "text/event-stream");
  std::string joined;
  std::size_t pos = 0;
  int events = 0;
  while ((pos = sse.body.find("data: ", pos)) != std::string::npos) {
    const auto end = sse.body.find("\n\n", pos);
    const std::string data = sse.body.substr(pos + 6, end - pos - 6);
    pos = end;
    if (data == "[DONE]") break;
    ++events;
    joined += field(data, "/choices/0/text");
  }
  EXPECT_EQ(joined, expected);
  EXPECT_GT(events, 1);
  EXPECT_NE(sse.body.find("data: [DONE]"), std::string::npos);
}

TEST(gateway, chat_completions_render_the_template) {
  served s;
  const std::string prompt = "<|user|>\nhello\n<|assistant|>\n";
  const std::string expected = s.greedy(prompt, 6);
  auto r = http_call(s.port, http::verb::post, "/v1/chat/completions",
                     R"({"messages": [{"role": "user", "content": "hello"}], "max_tokens": 6, "temperature": 0})");
  ASSERT_EQ(r.status, 200) << r.body;
  EXPECT_EQ(field(r.body, "/object"), "chat.completion");
  EXPECT_EQ(field(r.body, "/choices/0/message/role"), "assistant");
  EXPECT_EQ(field(r.body, "/choices/0/message/content"), expected);
}

TEST(gateway, bad_http_requests_say_what_is_wrong) {
  served s;
  auto check = [&](const std::string& target, const std::string& body, int status, const std::string& words) {
    auto r = http_call(s.port, http::verb::post, target, body);
    EXPECT_EQ(r.status, status) << body << " -> " << r.body;
    EXPECT_NE(r.body.find(words), std::string::npos) << body << " -> " << r.body;
  };
  check("/v1/completions", "{not json", 400, "malformed JSON");
  check("/v1/completions", R"({"prompt": 3})", 400, "'prompt' must be a string");
  check("/v1/completions", R"({"prompt": "x", "max_tokens": 1000})", 400, "between 1 and 64");
  check("/v1/completions", R"({"prompt": "x", "model": "gpt-4"})", 404, "not served here");
  check("/v1/completions", R"({"prompt": "x", "temperature": -2})", 400, "temperature");
  check("/v1/chat/completions", R"({"prompt": "x"})", 400, "messages");
  check("/v1/chat/completions", R"({"messages": [{"role": "robot", "content": "x"}]})", 400, "role 'robot'");
  std::string long_prompt;
  for (int i = 0; i < 3000; ++i) long_prompt += "light ";
  check("/v1/completions", R"({"prompt": ")" + long_prompt + R"(", "max_tokens": 8})", 400, "exceeds the context length");
  check("/v1/completions", std::string(5 << 20, ' '), 413, "exceeds");
  check("/v1/completions", "{\"prompt\": \"caf\xc3\"}", 400, "not valid UTF-8");
}

TEST(gateway, websocket_streams_multiplexed_requests_in_order) {
  served s;
  ws_client c(s.port);
  c.send(R"({"op": "ping"})");
  EXPECT_EQ(c.recv(), "{\"event\":\"pong\"}");
  const std::string a = s.greedy("In the beginning", 10), b = s.greedy("The quick brown fox", 7);
  c.send(R"({"op": "generate", "id": "a", "prompt": "In the beginning", "max_tokens": 10, "temperature": 0})");
  c.send(R"({"op": "generate", "id": "b", "prompt": "The quick brown fox", "max_tokens": 7, "temperature": 0})");
  std::map<std::string, std::string> text;
  std::map<std::string, std::string> done;
  while (done.size() < 2) {
    const std::string m = c.recv();
    const std::string event = field(m, "/event"), id = field(m, "/id");
    if (event == "token") {
      ASSERT_FALSE(done.count(id)) << "a token after done";
      text[id] += field(m, "/text");
    } else {
      ASSERT_EQ(event, "done") << m;
      done[id] = m;
    }
  }
  EXPECT_EQ(text["a"], a);
  EXPECT_EQ(text["b"], b);
  EXPECT_EQ(field(done["a"], "/finish_reason"), "length");
  EXPECT_NE(done["b"].find("\"completion_tokens\":7"), std::string::npos) << done["b"];
}

TEST(gateway, websocket_cancel_stop_and_bad_input) {
  served s;
  ws_client c(s.port);
  auto next_for = [&](const std::string& id, const std::string& event) {
    for (;;) {
      const std::string m = c.recv();
      if (field(m, "/id") == id && field(m, "/event") == event) return m;
    }
  };
  // Stop strings end the request without the stop text.
  const std::string full = s.greedy("In the beginning", 20);
  ASSERT_GE(full.size(), 6u);
  const std::string stop = full.substr(3, 3);
  c.send(R"({"op": "generate", "id": "s", "prompt": "In the beginning", "max_tokens": 20, "temperature": 0, "stop": [")" +
         stop + R"("]})");
  std::string got;
  for (;;) {
    const std::string m = c.recv();
    if (field(m, "/event") == "token") got += field(m, "/text");
    if (field(m, "/event") == "done") {
      EXPECT_EQ(field(m, "/finish_reason"), "stop");
      break;
    }
  }
  EXPECT_EQ(got, full.substr(0, full.find(stop)));
  // Cancel a long request.
  c.send(R"({"op": "generate", "id": "long", "prompt": "In the beginning", "max_tokens": 64, "temperature": 0.7, "seed": 1})");
  next_for("long", "token");
  c.send(R"({"op": "cancel", "id": "long"})");
  EXPECT_EQ(field(next_for("long", "done"), "/finish_reason"), "cancelled");
  // Bad input gets an error event and the connection keeps working.
  auto error_for = [&](const std::string& frame, const std::string& words) {
    c.send(frame);
    const std::string m = c.recv();
    EXPECT_EQ(field(m, "/event"), "error") << frame;
    EXPECT_NE(m.find(words), std::string::npos) << frame << " -> " << m;
  };
  error_for("{oops", "malformed JSON");
  error_for(R"({"op": "fly"})", "unknown op 'fly'");
  error_for(R"({"op": "generate", "id": "x", "prompt": "hi", "colour": 1})", "unknown field 'colour'");
  error_for(R"({"op": "cancel", "id": "never"})", "no request with id 'never'");
  error_for(R"({"op": "generate", "id": "y", "prompt": "hi", "max_tokens": 999})", "between 1 and 64");
  error_for(R"({"op": "generate", "prompt": "hi"})", "'id' is required");
  c.send(R"({"op": "ping"})");
  EXPECT_EQ(c.recv(), "{\"event\":\"pong\"}");
}

TEST(gateway, oversized_and_invalid_frames_close_the_connection_with_a_code) {
  gateway::gateway_options opt;
  opt.max_frame_bytes = 4096;
  served s(opt);
  {
    ws_client c(s.port);
    c.send(std::string(8192, 'x'));
    beast::flat_buffer b;
    beast::error_code ec;
    c.ws.read(b, ec);
    EXPECT_EQ(ec, websocket::error::closed);
    EXPECT_EQ(c.ws.reason().code, websocket::close_code::too_big);  // 1009
  }
  {
    ws_client c(s.port);
    c.send("{\"op\": \"ping\", \"x\": \"\xff\xfe\"}");
    beast::flat_buffer b;
    beast::error_code ec;
    c.ws.read(b, ec);
    EXPECT_EQ(ec, websocket::error::closed);
    EXPECT_EQ(c.ws.reason().code, websocket::close_code::bad_payload);  // 1007: invalid UTF-8
  }
  // Other clients are unaffected.
  ws_client ok(s.port);
  ok.send(R"({"op": "ping"})");
  EXPECT_EQ(ok.recv(), "{\"event\":\"pong\"}");
}

TEST(gateway, a_vanished_client_has_its_requests_cancelled) {
  served s;
  {
    ws_client c(s.port);
    c.send(R"({"op": "generate", "id": "gone", "prompt": "In the beginning", "max_tokens": 64, "temperature": 0.7})");
    c.recv();  // the first token: the request is running
  }  // the socket closes mid-stream
  scheduler_metrics m;
  for (int i = 0; i < 200; ++i) {
    caf::scoped_actor self{*s.sys};
    self->request(s.graph.scheduler, std::chrono::seconds(5), metrics_atom::value)
        .receive([&](scheduler_metrics& r) { m = r; }, [](caf::error&) {});
    if (m.requests_cancelled == 1 && m.running == 0 && s.server->requests_in_flight() == 0) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_EQ(m.requests_cancelled, 1);
  EXPECT_EQ(m.kv_blocks_used, 0);
  EXPECT_EQ(s.server->requests_in_flight(), 0u);
}

TEST(gateway, api_keys_guard_everything_but_health) {
  gateway::gateway_options opt;
  opt.api_keys = {"secret-1"};
  served s(opt);
  EXPECT_EQ(http_call(s.port, http::verb::get, "/health").status, 200);
  EXPECT_EQ(http_call(s.port, http::verb::get, "/v1/models").status, 401);
  EXPECT_EQ(http_call(s.port, http::verb::get, "/v1/models", {}, "wrong").status, 401);
  EXPECT_EQ(http_call(s.port, http::verb::get, "/v1/models", {}, "secret-1").status, 200);
  EXPECT_EQ(http_call(s.port, http::verb::get, "/metrics").status, 401);
  EXPECT_THROW(ws_client(s.port), boost::system::system_error);  // upgrade refused
  ws_client c(s.port, "secret-1");
  c.send(R"({"op": "ping"})");
  EXPECT_EQ(c.recv(), "{\"event\":\"pong\"}");
}

TEST(gateway, metrics_are_prometheus_text) {
  served s;
  http_call(s.port, http::verb::post, "/v1/completions", R"({"prompt": "In the beginning", "max_tokens": 4})");
  auto r = http_call(s.port, http::verb::get, "/metrics");
  ASSERT_EQ(r.status, 200);
  EXPECT_EQ(r.content_type, "text/plain; version=0.0.4");
  for (const char* name : {"troupe_requests_total{outcome=\"length\"} 1", "troupe_generation_tokens_total 4",
                           "troupe_time_to_first_token_seconds_count 1", "troupe_inter_token_latency_seconds_count 3",
                           "troupe_queue_depth 0", "troupe_running_sequences 0", "troupe_kv_blocks_used 0"})
    EXPECT_NE(r.body.find(name), std::string::npos) << name << "\n" << r.body;
}

}  // namespace troupe

namespace troupe {

// 200 WebSocket clients at once, 3 requests each on one connection: every request completes
// with exactly the greedy text, tokens before their done, and nothing is left in flight; more
// rounds do not grow the heap in use (nothing is retained per request or connection). The
// heap (malloc's bytes in use), not RSS: freed memory that glibc keeps in its per-thread
// arenas is not retained by the server.
std::int64_t heap_in_use_kib() { return static_cast<std::int64_t>(mallinfo2().uordblks / 1024); }

TEST(gateway, load_200_clients_each_with_several_requests) {
  served s({}, R"({"scheduler": {"max_waiting": 1024, "max_running": 64}})");
  const std::string expected = s.greedy("In the beginning", 4);
  constexpr int clients = 200, per_client = 3;
  auto round = [&] {
    std::atomic<int> ok{0}, bad{0};
    std::vector<std::thread> threads;
    for (int c = 0; c < clients; ++c)
      threads.emplace_back([&, c] {
        try {
          ws_client client(s.port);
          for (int r = 0; r < per_client; ++r)
            client.send(R"({"op": "generate", "id": "r)" + std::to_string(r) +
                        R"(", "prompt": "In the beginning", "max_tokens": 4, "temperature": 0})");
          std::map<std::string, std::string> text;
          std::set<std::string> done;
          while (done.size() < per_client) {
            const std::string m = client.recv();
            const std::string event = field(m, "/event"), id = field(m, "/id");
            if (event == "token" && !done.count(id)) text[id] += field(m, "/text");
            else if (event == "done") done.insert(id);
            else throw std::runtime_error("client " + std::to_string(c) + ": " + m);
          }
          for (const auto& [id, t] : text) (t == expected ? ok : bad)++;
        } catch (const std::exception& e) {
          ++bad;
          ADD_FAILURE() << e.what();
        }
      });
    for (auto& t : threads) t.join();
    EXPECT_EQ(ok.load(), clients * per_client);
    EXPECT_EQ(bad.load(), 0);
    EXPECT_EQ(s.server->requests_in_flight(), 0u);
  };
  for (int r = 0; r < 4; ++r) round();  // warm-up: caches and pools reach their working size
  const auto before = heap_in_use_kib();
  for (int r = 0; r < 3; ++r) round();
  const auto growth = heap_in_use_kib() - before;
  std::cerr << "  heap in use " << before << " KiB; growth over 3 more rounds of 600 requests: " << growth << " KiB\n";
  // Observed 0.4-2.2 MiB (0.2-1.2 KiB per request, not yet explained: see the issue note); a
  // leaked KV block or session (24+ KiB each) would put this far past the bound.
  EXPECT_LT(growth, 8 * 1024);
}

TEST(gateway, a_slow_reader_is_dropped_and_its_requests_cancelled) {
  gateway::gateway_options opt;
  opt.send_buffer_bytes = 1024;
  served s(opt);
  net::io_context ioc;
  websocket::stream<tcp::socket> ws{ioc};
  ws.next_layer().open(tcp::v4());
  ws.next_layer().set_option(net::socket_base::receive_buffer_size(2048));  // a small window: the server must queue
  ws.next_layer().connect(tcp::endpoint(net::ip::make_address("127.0.0.1"), s.port));
  ws.handshake("127.0.0.1", "/v1/stream");
  // Greedy on this prompt runs all 64 tokens: 16 x 64 events (~90 KB), far beyond what the
  // socket buffers hold while the client reads nothing.
  for (int r = 0; r < 16; ++r)
    ws.write(net::buffer(R"({"op": "generate", "id": "r)" + std::to_string(r) +
                         R"(", "prompt": "In the beginning", "max_tokens": 64, "temperature": 0})"));
  // Read nothing until the server has taken the requests and is done with them, one way or
  // the other (dropped and cancelled, or finished).
  for (int i = 0; i < 100 && s.server->requests_in_flight() == 0; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  for (int i = 0; i < 600 && s.server->requests_in_flight() > 0; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  int dones = 0;
  beast::error_code ec;
  while (dones < 16) {  // ends either way: dropped (an error) or every request done (the failure)
    beast::flat_buffer b;
    ws.read(b, ec);
    if (ec) break;
    if (beast::buffers_to_string(b.data()).find("\"done\"") != std::string::npos) ++dones;
  }
  EXPECT_TRUE(ec) << "the connection should have been dropped, not buffered";
  EXPECT_LT(dones, 16);
  for (int i = 0; i < 500 && s.server->requests_in_flight() > 0; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  EXPECT_EQ(s.server->requests_in_flight(), 0u);
}

TEST(gateway, idle_connections_time_out) {
  gateway::gateway_options opt;
  opt.idle_timeout = std::chrono::seconds(1);
  served s(opt);
  net::io_context ioc;
  tcp::socket raw(ioc);
  raw.connect(tcp::endpoint(net::ip::make_address("127.0.0.1"), s.port));
  std::this_thread::sleep_for(std::chrono::milliseconds(2500));  // says nothing at all
  char byte;
  beast::error_code ec;
  raw.read_some(net::buffer(&byte, 1), ec);
  EXPECT_TRUE(ec == net::error::eof || ec == net::error::connection_reset) << ec.message();
}

// Random and mutated frames through both parsers: each input yields a request or an error
// message, never a crash, an exception or a request that breaks the limits.
TEST(gateway, parser_fuzz) {
  const gateway::request_limits limits;
  const std::vector<std::string> seeds = {
      R"({"op": "generate", "id": "a", "prompt": "hi", "max_tokens": 5, "temperature": 0.5, "stop": ["x", "y"]})",
      R"({"op": "generate", "id": "b", "messages": [{"role": "user", "content": "yo"}], "top_k": 3, "seed": 9})",
      R"({"op": "cancel", "id": "a"})", R"({"op": "ping"})",
      R"({"model": "demo", "prompt": ["hi"], "max_tokens": 3, "stream": true, "n": 1})",
      R"({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}], "top_p": 0.9})"};
  std::uint64_t x = 12345;
  auto next = [&] { return x = x * 6364136223846793005ull + 1442695040888963407ull, x >> 33; };
  int requests = 0, errors = 0;
  for (int i = 0; i < 30000; ++i) {
    std::string frame;
    if (i % 5 == 0) {  // random bytes
      const auto n = next() % 64;
      for (std::uint64_t k = 0; k < n; ++k) frame += static_cast<char>(next() % 256);
    } else {  // a mutated valid frame: flips, cuts, insertions, duplications
      frame = seeds[next() % seeds.size()];
      for (int m = 0, count = 1 + static_cast<int>(next() % 4); m < count && !frame.empty(); ++m) {
        const auto pos = next() % frame.size();
        switch (next() % 4) {
          case 0: frame[pos] = static_cast<char>(frame[pos] ^ (1 << (next() % 8))); break;
          case 1: frame.resize(pos); break;
          case 2: {
            static constexpr char structural[] = "{}[]\":,0-9e";
            frame.insert(pos, 1, structural[next() % (sizeof structural - 1)]);
            break;
          }
          case 3: frame.insert(pos, frame.substr(pos, next() % 8)); break;
        }
      }
    }
    for (int kind = 0; kind < 3; ++kind) {
      if (kind == 0) {
        auto r = gateway::parse_ws_request(frame, limits);
        if (auto* ok = std::get_if<gateway::ws_request>(&r)) {
          ++requests;
          if (ok->op == gateway::ws_op::generate) {
            EXPECT_TRUE(ok->generate.prompt || !ok->generate.messages.empty());
            EXPECT_TRUE(ok->generate.max_tokens >= 1 && ok->generate.max_tokens <= limits.max_tokens);
            EXPECT_FALSE(ok->id.empty());
          }
        } else {
          ++errors;
          EXPECT_FALSE(std::get<gateway::parse_error>(r).message.empty());
        }
      } else {
        auto r = gateway::parse_openai_request(frame, kind == 2, limits);
        if (auto* ok = std::get_if<gateway::parsed_generate>(&r)) {
          ++requests;
          EXPECT_TRUE(ok->prompt || !ok->messages.empty());
        } else {
          ++errors;
        }
      }
    }
  }
  EXPECT_GT(requests, 100);  // mutations keep some frames valid: the valid paths are exercised too
  EXPECT_GT(errors, 1000);
}

}  // namespace troupe

namespace troupe {

TEST(gateway, requests_in_flight_finish_after_accepting_stops) {
  served s;
  ws_client c(s.port);
  c.send(R"({"op": "generate", "id": "a", "prompt": "In the beginning", "max_tokens": 60, "temperature": 0.7, "seed": 2})");
  c.recv();  // streaming
  s.server->stop_accepting();
  for (;;) {
    const std::string m = c.recv();
    if (field(m, "/event") == "done") break;
  }
  EXPECT_EQ(s.server->requests_in_flight(), 0u);
  EXPECT_THROW(ws_client(s.port), boost::system::system_error);  // no new connections
}

}  // namespace troupe

namespace troupe {

TEST(gateway, http_stream_finishes_after_accepting_stops) {
  served s;
  std::thread stopper([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    s.server->stop_accepting();
  });
  auto sse = http_call(s.port, http::verb::post, "/v1/completions",
                       R"({"prompt": "In the beginning", "max_tokens": 60, "temperature": 0.7, "seed": 3, "stream": true})");
  stopper.join();
  EXPECT_NE(sse.body.find("data: [DONE]"), std::string::npos)
      << sse.status << " " << sse.body.size() << " ..." << sse.body.substr(sse.body.size() > 300 ? sse.body.size() - 300 : 0);
}

}  // namespace troupe

namespace troupe {

TEST(gateway, connection_limit_refuses_with_503) {
  gateway::gateway_options opt;
  opt.max_connections = 2;
  served s(opt);
  ws_client a(s.port), b(s.port);
  auto r = http_call(s.port, http::verb::get, "/health");
  EXPECT_EQ(r.status, 503);
  EXPECT_NE(r.body.find("too many connections"), std::string::npos);
  a.send(R"({"op": "ping"})");
  EXPECT_EQ(a.recv(), "{\"event\":\"pong\"}");  // the connections held keep working
}

TEST(gateway, chat_template_files_are_read_and_checked) {
  const auto dir = test::temp_dir("chat_template");
  std::ofstream(dir / "ok.json") << R"({"message": "[{role}] {content}\n", "generation_prompt": "[assistant] "})";
  const auto t = gateway::chat_template::load((dir / "ok.json").string());
  EXPECT_EQ(t.render({{"user", "hi"}, {"assistant", "yo"}}), "[user] hi\n[assistant] yo\n[assistant] ");
  std::ofstream(dir / "bad.json") << R"({"message": "no content here"})";
  EXPECT_THROW(gateway::chat_template::load((dir / "bad.json").string()), input_error);
  EXPECT_THROW(gateway::chat_template::load((dir / "missing.json").string()), input_error);
}

}  // namespace troupe

namespace troupe {

TEST(gateway, request_limits_per_connection_and_in_total) {
  gateway::gateway_options opt;
  opt.max_requests_per_connection = 2;
  opt.max_requests_total = 3;
  served s(opt);
  ws_client a(s.port), b(s.port);
  auto start = [](ws_client& c, const std::string& id) {
    // Greedy on this prompt runs the full 64 tokens (no EOS): long enough to overlap the checks.
    c.send(R"({"op": "generate", "id": ")" + id + R"(", "prompt": "In the beginning", "max_tokens": 64, "temperature": 0})");
  };
  start(a, "1");
  start(a, "2");
  start(a, "3");  // a third on one connection
  for (;;) {
    const std::string m = a.recv();
    if (field(m, "/event") == "error") {
      EXPECT_EQ(field(m, "/id"), "3");
      EXPECT_NE(m.find("too many requests in flight on this connection"), std::string::npos) << m;
      break;
    }
  }
  start(b, "x");
  start(b, "y");  // the server's fourth
  for (int dones = 0; dones < 2;) {
    const std::string m = b.recv();
    if (field(m, "/event") == "done") ++dones;
    if (field(m, "/event") == "error") {
      EXPECT_NE(m.find("request limit"), std::string::npos) << m;
      break;
    }
  }
  EXPECT_EQ(s.server->requests_in_flight() <= 3u, true);
}

// The issue's hot-swap check: 32 requests stream over HTTP while an admin swaps the draft
// back and forth (and offers two it must refuse: another vocabulary, another tokenizer);
// every request completes with exactly the greedy output of the target alone.
TEST(gateway, draft_hot_swaps_under_load_change_no_output) {
  const auto perfect = model_dir("gateway_draft_perfect", demo_tiny(), 3);  // the target's weights: all accepted
  std::ifstream in(std::string(TROUPE_SOURCE_DIR) + "/configs/models/demo-tiny.json");
  std::string json((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  json.replace(json.find("LongcatFlashNgramForCausalLM"), 28, "LongcatFlashForCausalLM");  // plain embeddings
  json.replace(json.find("\"num_layers\": 2"), 15, "\"num_layers\": 1");
  json.replace(json.find("\"num_hidden_layers\": 4"), 22, "\"num_hidden_layers\": 2");
  const auto weak = model_dir("gateway_draft_weak", parse_model_config(json, "plain-draft"), 8);
  const auto other_vocab = test::make_model("gateway_draft_vocab", test::tiny_config(R"("vocab_size": 101)", false), 5);
  const auto other_tok = test::temp_dir("gateway_draft_tok");
  for (const auto& f : std::filesystem::directory_iterator(weak)) std::filesystem::copy(f.path(), other_tok / f.path().filename());
  std::ofstream(other_tok / "tokenizer.json", std::ios::app) << "\n";  // other bytes: treated as another tokenizer
  gateway::gateway_options opt;
  opt.admin_keys = {"admin-secret"};
  served s(opt, R"({"speculation": {"draft": ")" + weak.string() + R"(", "draft_tokens": 3, "retry_after": 0, "max_batch": 0}})");
  const int n = 32, max_tokens = 24;
  std::vector<std::string> prompts, expected(n), got(n);
  std::vector<std::int64_t> drafted(n, 0);
  for (int i = 0; i < n; ++i) {
    prompts.push_back("Request " + std::to_string(i) + (i % 2 ? " once upon a time" : " <|eos|> and then"));
    expected[static_cast<std::size_t>(i)] = s.greedy(prompts.back(), max_tokens);
  }
  std::atomic<int> running{n};
  std::vector<std::thread> clients;
  for (int i = 0; i < n; ++i)
    clients.emplace_back([&, i] {
      json_writer w;
      w.begin_object().key("prompt").value(prompts[static_cast<std::size_t>(i)]).key("max_tokens").value(max_tokens);
      w.key("temperature").value(0.0).end_object();
      const auto r = http_call(s.port, http::verb::post, "/v1/completions", w.str());
      got[static_cast<std::size_t>(i)] = r.status == 200 ? field(r.body, "/choices/0/text") : "HTTP " + std::to_string(r.status) + " " + r.body;
      simdjson::dom::parser p;
      simdjson::padded_string body(r.body);
      std::int64_t d = 0;
      if (!p.parse(body).at_pointer("/usage/speculation/drafted_tokens").get_int64().get(d)) drafted[static_cast<std::size_t>(i)] = d;
      --running;
    });
  int swaps = 0, refusals = 0;
  const std::vector<std::filesystem::path> cycle{perfect, weak, other_vocab, perfect, other_tok, weak};
  for (std::size_t i = 0; running > 0 || swaps < 3; ++i) {
    const auto& next = cycle[i % cycle.size()];
    const auto r = http_call(s.port, http::verb::post, "/admin/draft", "{\"model\": \"" + next.string() + "\"}", "admin-secret");
    if (next == other_vocab || next == other_tok) {
      EXPECT_EQ(r.status, 422) << r.body;
      EXPECT_NE(r.body.find(next == other_vocab ? "vocabulary" : "tokenizer"), std::string::npos) << r.body;
      ++refusals;
    } else {
      EXPECT_EQ(r.status, 200) << r.body;
      swaps += r.status == 200;
    }
  }
  for (auto& c : clients) c.join();
  for (int i = 0; i < n; ++i) EXPECT_EQ(got[static_cast<std::size_t>(i)], expected[static_cast<std::size_t>(i)]) << "request " << i;
  EXPECT_GT(std::accumulate(drafted.begin(), drafted.end(), std::int64_t{0}), 0) << "nothing was drafted";
  EXPECT_GE(swaps, 3);
  EXPECT_GE(refusals, 1);
  // One command rolls back to the previous draft; the admin endpoints want the admin key.
  const auto info = http_call(s.port, http::verb::get, "/admin/draft", {}, "admin-secret");
  const auto back = http_call(s.port, http::verb::post, "/admin/draft/rollback", {}, "admin-secret");
  EXPECT_EQ(back.status, 200) << back.body;
  const auto after = http_call(s.port, http::verb::get, "/admin/draft", {}, "admin-secret");
  EXPECT_EQ(field(after.body, "/dir"), field(info.body, "/previous_dir"));
  EXPECT_EQ(http_call(s.port, http::verb::get, "/admin/draft", {}, "wrong").status, 401);
  EXPECT_EQ(http_call(s.port, http::verb::post, "/admin/draft", "{\"modle\": 1}", "admin-secret").status, 400);
  const auto metrics = http_call(s.port, http::verb::get, "/metrics").body;
  EXPECT_NE(metrics.find("troupe_speculation_drafted_tokens_total{draft=\""), std::string::npos);
  EXPECT_NE(metrics.find("troupe_request_acceptance_length_count"), std::string::npos);
}

TEST(gateway, admin_endpoints_are_off_without_admin_keys) {
  served s;
  EXPECT_EQ(http_call(s.port, http::verb::get, "/admin/draft").status, 403);
  gateway::gateway_options opt;
  opt.admin_keys = {"k"};
  served t(opt);
  const auto r = http_call(t.port, http::verb::post, "/admin/draft/rollback", {}, "k");
  EXPECT_EQ(r.status, 409) << r.body;  // no draft in this topology
  EXPECT_NE(r.body.find("does not speculate"), std::string::npos);
}

}  // namespace troupe
