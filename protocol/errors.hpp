// Error kinds shared by every subsystem. Each means one thing:
//   input_error     the user's input is wrong (a config, checkpoint, request, file); the message
//                   says what was expected, what was found and where. Recoverable.
//   std::logic_error a bug in Troupe (a broken invariant). Not caught to be hidden.
// Actor handlers convert both into error replies that carry the request's context.
#pragma once

#include <stdexcept>
#include <string>

namespace troupe {

class input_error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace troupe
