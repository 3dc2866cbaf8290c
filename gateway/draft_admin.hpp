// The gateway's admin requests to the draft actor (hot swap of the speculative draft):
// load a draft checkpoint, roll back to the previous one, describe the current one.
// The answer comes back through a callback on a CAF thread; the caller posts it to its
// connection.
#pragma once

#include <caf/fwd.hpp>

#include <functional>
#include <string>

namespace troupe::gateway {

enum class draft_op : std::uint8_t { info, load, rollback };

/// Asks `draft` (a draft_actor) to perform `op` (`dir`: the checkpoint to load); `done`
/// receives (true, the actor's answer) or (false, why it failed). Loading waits up to `timeout_s`.
void ask_draft(caf::actor_system& sys, const caf::actor& draft, draft_op op, std::string dir,
               std::function<void(bool ok, std::string answer)> done, int timeout_s = 600);

}  // namespace troupe::gateway
