// Gateway overhead: time to first token and inter-token latency of greedy requests through
// the WebSocket gateway against the same requests sent to the scheduler actor directly, same
// model, same process, one run (sequential requests, so each measures latency, not queueing).
//   troupe_bench_gateway MODEL_DIR [REQUESTS] [TOKENS]
#include <boost/asio/ip/tcp.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/websocket.hpp>
#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/io/middleman.hpp>
#include <caf/scoped_actor.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>

#include "actors/compute.hpp"
#include "gateway/server.hpp"
#include "graph/inference_graph.hpp"
#include "protocol/type_registry.hpp"
#include "tokenizer/tokenizer.hpp"

using namespace std::chrono;
namespace beast = boost::beast;
namespace net = boost::asio;

struct latency {
  std::vector<double> ttft, itl;
  void add(double first, const std::vector<double>& gaps) {
    ttft.push_back(first);
    itl.insert(itl.end(), gaps.begin(), gaps.end());
  }
  static double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v.empty() ? 0 : v[v.size() / 2];
  }
};

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s MODEL_DIR [REQUESTS] [TOKENS]\n", argv[0]);
    return 2;
  }
  const int requests = argc > 2 ? std::atoi(argv[2]) : 50, tokens = argc > 3 ? std::atoi(argv[3]) : 32;
  caf::actor_system_config cfg;
  troupe::add_message_types(cfg);
  cfg.load<caf::io::middleman>();
  caf::actor_system sys{cfg};
  auto compute = troupe::load_compute(argv[1], 0);
  auto tok = std::make_shared<const troupe::tokenizer>(troupe::tokenizer::load(std::string(argv[1]) + "/tokenizer.json"));
  auto graph = troupe::inference_graph::start(sys, compute, troupe::local_topology(compute->net->config()));
  troupe::gateway::gateway_options opt;
  opt.port = 0;
  troupe::gateway::gateway_server server(sys, caf::actor_cast<caf::actor>(graph.scheduler), tok, compute->net->config(), opt);
  server.start();

  latency direct, via_gateway;
  const auto prompt = tok->encode("In the beginning God created the heaven and the earth.");
  for (int i = 0; i < requests + 3; ++i) {  // the first 3 of each are warm-up
    // Direct: a client actor talking to the scheduler.
    {
      caf::scoped_actor self{sys};
      troupe::generate_request r;
      r.id = "d" + std::to_string(i);
      r.prompt = prompt;
      r.sampling.temperature = 0;
      r.max_tokens = tokens;
      r.stop_on_eos = false;
      const auto t0 = steady_clock::now();
      self->request(graph.scheduler, seconds(30), troupe::generate_atom::value, r, caf::actor_cast<caf::actor>(self))
          .receive([](bool) {}, [](caf::error&) {});
      auto last = t0;
      double first = 0;
      std::vector<double> gaps;
      for (bool done = false; !done;)
        self->receive([&](troupe::token_atom, std::string&, std::int32_t) {
                        const auto now = steady_clock::now();
                        if (first == 0) first = duration<double>(now - t0).count();
                        else gaps.push_back(duration<double>(now - last).count());
                        last = now;
                      },
                      [&](troupe::done_atom, troupe::request_done&) { done = true; });
      if (i >= 3) direct.add(first, gaps);
    }
    // Through the gateway: a WebSocket client on loopback.
    {
      net::io_context ioc;
      beast::websocket::stream<net::ip::tcp::socket> ws{ioc};
      ws.next_layer().connect({net::ip::make_address("127.0.0.1"), server.port()});
      ws.handshake("127.0.0.1", "/v1/stream");
      const std::string req = "{\"op\":\"generate\",\"id\":\"g\",\"prompt\":\"In the beginning God created the heaven and the earth.\","
                              "\"max_tokens\":" + std::to_string(tokens) + ",\"temperature\":0}";
      const auto t0 = steady_clock::now();
      ws.write(net::buffer(req));
      auto last = t0;
      double first = 0;
      std::vector<double> gaps;
      for (;;) {
        beast::flat_buffer b;
        ws.read(b);
        const auto s = beast::buffers_to_string(b.data());
        const auto now = steady_clock::now();
        if (s.find("\"done\"") != std::string::npos || s.find("\"error\"") != std::string::npos) break;
        if (first == 0) first = duration<double>(now - t0).count();
        else gaps.push_back(duration<double>(now - last).count());
        last = now;
      }
      if (i >= 3) via_gateway.add(first, gaps);
    }
  }
  const double d_ttft = latency::median(direct.ttft) * 1e3, g_ttft = latency::median(via_gateway.ttft) * 1e3;
  const double d_itl = latency::median(direct.itl) * 1e3, g_itl = latency::median(via_gateway.itl) * 1e3;
  std::printf("%d greedy requests x %d tokens, %s (medians)\n", requests, tokens, argv[1]);
  std::printf("time to first token: scheduler direct %.3f ms, through the WebSocket gateway %.3f ms (+%.3f ms, x%.2f)\n",
              d_ttft, g_ttft, g_ttft - d_ttft, g_ttft / d_ttft);
  std::printf("inter-token latency: scheduler direct %.3f ms, through the WebSocket gateway %.3f ms (+%.3f ms, x%.2f)\n",
              d_itl, g_itl, g_itl - d_itl, g_itl / d_itl);
  server.stop();
  graph.stop(sys);
  return 0;
}
