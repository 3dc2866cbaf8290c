#include "actors/tokenizer_actor.hpp"

#include <caf/actor_system.hpp>
#include <caf/stateful_actor.hpp>
#include <caf/typed_event_based_actor.hpp>

#include <unordered_map>

namespace troupe {
namespace {

struct tokenizer_state {
  tokenizer_state() = default;
  std::shared_ptr<const tokenizer> tok;
  std::unordered_map<std::string, stream_decoder> streams;
  static inline const char* name = "troupe.tokenizer";
};

tokenizer_actor::behavior_type tokenizer_impl(tokenizer_actor::stateful_pointer<tokenizer_state> self,
                                              std::shared_ptr<const tokenizer> tok) {
  self->state.tok = std::move(tok);
  return {
      [=](encode_atom, std::string& text, bool parse_special) -> std::vector<std::int32_t> {
        return self->state.tok->encode(text, parse_special ? special_tokens::parse : special_tokens::as_text);
      },
      [=](decode_atom, std::string& id, std::int32_t token) -> caf::result<std::string> {
        auto& st = self->state;
        auto it = st.streams.try_emplace(id, *st.tok).first;
        try {
          return it->second.push(token);
        } catch (const std::exception& e) {
          return caf::make_error(caf::sec::runtime_error, "tokenizer: request '" + id + "': " + e.what());
        }
      },
      [=](flush_atom, std::string& id) -> std::string {
        auto& st = self->state;
        auto it = st.streams.find(id);
        if (it == st.streams.end()) return {};
        std::string rest = it->second.flush();
        st.streams.erase(it);
        return rest;
      },
  };
}

}  // namespace

tokenizer_actor spawn_tokenizer(caf::actor_system& sys, std::shared_ptr<const tokenizer> tok) {
  return sys.spawn(tokenizer_impl, std::move(tok));
}

}  // namespace troupe
