// One generation request in flight through the gateway: a CAF actor subscribed to the
// scheduler's token/done events for it, turning ids into streamed text (stop strings
// included) and handing each event to a sink that the connection provides. The sink is called
// on a CAF thread; connections post into their own executor.
#pragma once

#include <caf/fwd.hpp>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "gateway/metrics.hpp"
#include "protocol/messages.hpp"

namespace troupe {
class tokenizer;
}

namespace troupe::gateway {

struct relay_events {
  std::function<void(const std::string& text, std::int32_t token)> on_token;
  /// finish_reason: "eos", "length", "stop", "cancelled" or "error" (then `error` says why).
  std::function<void(const std::string& finish_reason, const request_done& done)> on_done;
};

/// Spawns the relay and submits the request; `submit_error` receives the scheduler's refusal
/// (the relay then ends without events).
caf::actor start_relay(caf::actor_system& sys, const caf::actor& scheduler, std::shared_ptr<const tokenizer> tok,
                       generate_request req, std::vector<std::string> stop, std::int32_t eos_token_id,
                       std::shared_ptr<gateway_metrics> metrics,
                       relay_events events, std::function<void(const std::string&)> submit_error);

}  // namespace troupe::gateway
