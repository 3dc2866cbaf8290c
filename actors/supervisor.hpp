// The supervisor of a process's graph actors. It monitors each one; when one dies for any
// reason but a shutdown, the requests it was serving have already failed with an error (CAF
// answers pending requests of a dead actor), and the supervisor spawns a replacement from the
// loaded weights and tells the actors that send to it the new handle. When the supervisor
// stops, it stops every actor it watches.
#pragma once

#include <caf/actor.hpp>

#include <functional>
#include <string>
#include <vector>

namespace troupe {

struct supervised_actor {
  std::string name;                                 // for logs: "expert shard 1", "stage 0"
  caf::actor current;
  std::function<caf::actor()> respawn;              // a fresh actor, from the weights
  std::function<void(const caf::actor&)> rewire;    // hand the new actor to its senders
  bool holds_sequence_state = false;                // its death loses running sequences' state
};

/// At most `max_restarts` restarts per actor; past that it stays down (and says so).
/// `scheduler` hears of each death (actor_down_atom) before the replacement is wired in, so it
/// can fail the step in flight at once.
caf::actor spawn_supervisor(caf::actor_system& sys, std::vector<supervised_actor> actors, caf::actor scheduler,
                            int max_restarts = 10);

}  // namespace troupe
