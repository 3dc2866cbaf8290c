#include "protocol/messages.hpp"

namespace troupe {

const char* to_string(request_end e) {
  switch (e) {
    case request_end::eos: return "eos";
    case request_end::length: return "length";
    case request_end::cancelled: return "cancelled";
    case request_end::error: return "error";
  }
  return "?";
}

}  // namespace troupe
