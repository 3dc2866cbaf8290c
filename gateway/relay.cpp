#include "gateway/relay.hpp"

#include <caf/actor_system.hpp>
#include <caf/event_based_actor.hpp>
#include <caf/send.hpp>

#include <chrono>

#include "model/text_stream.hpp"
#include "protocol/interfaces.hpp"

namespace troupe::gateway {

caf::actor start_relay(caf::actor_system& sys, const caf::actor& scheduler, std::shared_ptr<const tokenizer> tok,
                       generate_request req, std::vector<std::string> stop, std::int32_t eos_token_id,
                       std::shared_ptr<gateway_metrics> metrics,
                       relay_events events, std::function<void(const std::string&)> submit_error) {
  const auto sched = caf::actor_cast<scheduler_actor>(scheduler);
  return sys.spawn([=](caf::event_based_actor* self) -> caf::behavior {
    struct state_t {
      std::unique_ptr<text_stream> stream;
      bool stopped = false;
      std::chrono::steady_clock::time_point last;
      bool first = true;
    };
    auto st = std::make_shared<state_t>();
    st->stream = std::make_unique<text_stream>(*tok, stop);
    st->last = std::chrono::steady_clock::now();
    const auto started = st->last;
    self->request(sched, std::chrono::seconds(30), generate_atom::value, req, caf::actor_cast<caf::actor>(self))
        .then([](bool) {},
              [=](caf::error& err) {
                metrics->request_finished("rejected");
                submit_error(self->system().render(err));
                self->quit();
              });
    return {
        [=](token_atom, std::string& id, std::int32_t token) {
          if (st->stopped) return;
          const auto now = std::chrono::steady_clock::now();
          if (st->first) metrics->time_to_first_token(std::chrono::duration<double>(now - started).count());
          else metrics->inter_token(std::chrono::duration<double>(now - st->last).count());
          st->first = false;
          st->last = now;
          if (req.stop_on_eos && token == eos_token_id) return;  // the end, not text
          auto update = st->stream->push(token);
          if (!update.text.empty()) events.on_token(update.text, token);
          if (update.stopped) {  // a stop string: end the request in the scheduler too
            st->stopped = true;
            caf::anon_send(sched, cancel_atom::value, id);
          }
        },
        [=](done_atom, request_done& done) {
          std::string reason = to_string(done.reason);
          if (st->stopped) reason = "stop";
          if (reason != "error" && reason != "stop") {
            const std::string rest = st->stream->finish();
            if (!rest.empty()) events.on_token(rest, -1);
          }
          metrics->request_finished(reason);
          metrics->tokens(done.prompt_tokens, done.completion_tokens);
          events.on_done(reason, done);
          self->quit();
        },
    };
  });
}

}  // namespace troupe::gateway
