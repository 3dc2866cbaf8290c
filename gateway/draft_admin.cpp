#include "gateway/draft_admin.hpp"

#include <caf/actor_system.hpp>
#include <caf/event_based_actor.hpp>

#include "protocol/error_text.hpp"
#include "protocol/interfaces.hpp"

namespace troupe::gateway {

namespace {

// One admin question to the draft actor; quits with the answer. (Spawned with arguments rather
// than as a capturing lambda: CAF 0.17 binds a null argument tuple for argument-less spawns.)
void ask(caf::event_based_actor* self, draft_actor draft, draft_op op, std::string dir,
         std::function<void(bool, std::string)> done, int timeout_s) {
  auto reply = [=](std::string& answer) {
    done(true, answer);
    self->quit();
  };
  auto fail = [=](caf::error& err) {
    done(false, error_text(self->system(), err));
    self->quit();
  };
  const std::chrono::seconds timeout(timeout_s);
  switch (op) {
    case draft_op::info: self->request(draft, timeout, draft_info_atom::value).then(reply, fail); break;
    case draft_op::load: self->request(draft, timeout, load_draft_atom::value, dir).then(reply, fail); break;
    case draft_op::rollback: self->request(draft, timeout, rollback_atom::value).then(reply, fail); break;
  }
}

}  // namespace

void ask_draft(caf::actor_system& sys, const caf::actor& draft, draft_op op, std::string dir,
               std::function<void(bool, std::string)> done, int timeout_s) {
  sys.spawn(ask, caf::actor_cast<draft_actor>(draft), op, std::move(dir), std::move(done), timeout_s);
}

}  // namespace troupe::gateway
