#include "actors/supervisor.hpp"

#include <caf/actor_system.hpp>
#include <caf/event_based_actor.hpp>
#include <caf/send.hpp>
#include <caf/stateful_actor.hpp>

#include <iostream>

#include "protocol/interfaces.hpp"

namespace troupe {
namespace {

struct supervisor_state {
  supervisor_state() = default;
  std::vector<supervised_actor> actors;
  std::vector<int> restarts;
  caf::actor scheduler;
  int max_restarts = 10;
  static inline const char* name = "troupe.supervisor";
};

caf::behavior supervisor_impl(caf::stateful_actor<supervisor_state>* self, std::vector<supervised_actor> actors,
                              caf::actor scheduler, int max_restarts) {
  self->state.actors = std::move(actors);
  self->state.scheduler = std::move(scheduler);
  self->state.restarts.assign(self->state.actors.size(), 0);
  self->state.max_restarts = max_restarts;
  for (const auto& a : self->state.actors) self->monitor(a.current);
  self->set_exit_handler([self](caf::exit_msg& msg) {  // stopping the supervisor stops what it watches
    for (const auto& a : self->state.actors) caf::anon_send_exit(a.current, caf::exit_reason::user_shutdown);
    self->quit(msg.reason);
  });
  self->set_down_handler([self](const caf::down_msg& down) {
    auto& st = self->state;
    for (std::size_t i = 0; i < st.actors.size(); ++i) {
      auto& a = st.actors[i];
      if (a.current.address() != down.source) continue;
      if (down.reason == caf::exit_reason::user_shutdown || down.reason == caf::exit_reason::normal) return;
      const std::string why = self->system().render(down.reason);
      caf::anon_send(st.scheduler, actor_down_atom::value, a.name + " died (" + why + ")", a.holds_sequence_state);
      if (st.restarts[i] >= st.max_restarts) {
        std::cerr << "[supervisor] " << a.name << " died (" << why << ") after " << st.restarts[i]
                  << " restarts; leaving it down\n";
        return;
      }
      ++st.restarts[i];
      a.current = a.respawn();
      a.rewire(a.current);
      self->monitor(a.current);
      std::cerr << "[supervisor] " << a.name << " died (" << why << "); restarted from its weights (restart "
                << st.restarts[i] << ")\n";
      return;
    }
  });
  return {
      [self](metrics_atom) { return self->state.restarts; },  // restarts per supervised actor, in order
  };
}

}  // namespace

caf::actor spawn_supervisor(caf::actor_system& sys, std::vector<supervised_actor> actors, caf::actor scheduler,
                            int max_restarts) {
  return sys.spawn(supervisor_impl, std::move(actors), std::move(scheduler), max_restarts);
}

}  // namespace troupe
