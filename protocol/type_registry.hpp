// Registers every message type of the graph with an actor system's config, so messages can be
// serialized when an edge crosses a process. Call before creating the actor_system.
#pragma once

namespace caf {
class actor_system_config;
}

namespace troupe {

void add_message_types(caf::actor_system_config& cfg);

}  // namespace troupe
