#include "protocol/error_text.hpp"

#include <caf/actor_system.hpp>
#include <caf/error.hpp>

namespace troupe {

std::string error_text(caf::actor_system& sys, const caf::error& e) {
  if (e.category() == caf::atom("system") && e.context().match_elements<std::string>()) return e.context().get_as<std::string>(0);
  return sys.render(e);
}

}  // namespace troupe
