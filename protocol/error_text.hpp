// The text of an error reply: the message a runtime_error carries (what the failing actor
// said), or CAF's rendering of any other error. Include only from .cpp files.
#pragma once

#include <caf/fwd.hpp>

#include <string>

namespace troupe {

std::string error_text(caf::actor_system& sys, const caf::error& e);

}  // namespace troupe
