// The tokenizer actor: encodes prompts and turns each request's stream of token ids into text
// deltas (never half a UTF-8 character), keeping one streaming decoder per request id until
// the request's stream is flushed.
#pragma once

#include <caf/fwd.hpp>

#include <memory>

#include "protocol/interfaces.hpp"
#include "tokenizer/tokenizer.hpp"

namespace troupe {

tokenizer_actor spawn_tokenizer(caf::actor_system& sys, std::shared_ptr<const tokenizer> tok);

}  // namespace troupe
