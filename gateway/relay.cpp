#include "gateway/relay.hpp"

#include <caf/actor_system.hpp>
#include <caf/event_based_actor.hpp>
#include <caf/send.hpp>

#include <chrono>

#include "model/text_stream.hpp"
#include "protocol/interfaces.hpp"

namespace troupe::gateway {

namespace {

struct relay_args {
  scheduler_actor scheduler;
  std::shared_ptr<const tokenizer> tok;
  generate_request req;
  std::vector<std::string> stop;
  std::int32_t eos_token_id;
  std::shared_ptr<gateway_metrics> metrics;
  relay_events events;
  std::function<void(const std::string&)> submit_error;
};

struct relay_state {
  std::unique_ptr<text_stream> stream;
  bool stopped = false, first = true;
  std::chrono::steady_clock::time_point started, last;
};

caf::behavior relay_impl(caf::event_based_actor* self, std::shared_ptr<relay_args> a) {
  auto st = std::make_shared<relay_state>();
  st->stream = std::make_unique<text_stream>(*a->tok, a->stop);
  st->started = st->last = std::chrono::steady_clock::now();
  // If the scheduler goes away (shutdown), the request can never finish: end it now.
  self->monitor(a->scheduler);
  self->set_down_handler([=](caf::down_msg& down) {
    request_done done;
    done.id = a->req.id;
    done.reason = request_end::error;
    done.error = "the scheduler stopped (" + self->system().render(down.reason) + ")";
    a->metrics->request_finished("error");
    a->events.on_done("error", done);
    self->quit();
  });
  self->request(a->scheduler, std::chrono::seconds(30), generate_atom::value, a->req, caf::actor_cast<caf::actor>(self))
      .then([](bool) {},
            [=](caf::error& err) {
              a->metrics->request_finished("rejected");
              a->submit_error(self->system().render(err));
              self->quit();
            });
  return {
      [=](token_atom, std::string& id, std::int32_t token) {
        if (st->stopped) return;
        const auto now = std::chrono::steady_clock::now();
        if (st->first) a->metrics->time_to_first_token(std::chrono::duration<double>(now - st->started).count());
        else a->metrics->inter_token(std::chrono::duration<double>(now - st->last).count());
        st->first = false;
        st->last = now;
        if (a->req.stop_on_eos && token == a->eos_token_id) return;  // the end, not text
        auto update = st->stream->push(token);
        if (!update.text.empty()) a->events.on_token(update.text, token);
        if (update.stopped) {  // a stop string: end the request in the scheduler too
          st->stopped = true;
          caf::anon_send(a->scheduler, cancel_atom::value, id);
        }
      },
      [=](done_atom, request_done& done) {
        std::string reason = to_string(done.reason);
        if (st->stopped) reason = "stop";
        if (reason != "error" && reason != "stop") {
          const std::string rest = st->stream->finish();
          if (!rest.empty()) a->events.on_token(rest, -1);
        }
        a->metrics->request_finished(reason);
        a->metrics->tokens(done.prompt_tokens, done.completion_tokens);
        a->metrics->speculation(done);
        a->events.on_done(reason, done);
        self->quit();
      },
  };
}

}  // namespace

caf::actor start_relay(caf::actor_system& sys, const caf::actor& scheduler, std::shared_ptr<const tokenizer> tok,
                       generate_request req, std::vector<std::string> stop, std::int32_t eos_token_id,
                       std::shared_ptr<gateway_metrics> metrics, relay_events events,
                       std::function<void(const std::string&)> submit_error) {
  auto args = std::make_shared<relay_args>(relay_args{caf::actor_cast<scheduler_actor>(scheduler), std::move(tok),
                                                      std::move(req), std::move(stop), eos_token_id, std::move(metrics),
                                                      std::move(events), std::move(submit_error)});
  return sys.spawn(relay_impl, std::move(args));
}

}  // namespace troupe::gateway
