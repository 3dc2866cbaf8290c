// How the graph's messages cross process boundaries: CAF inspect() overloads. A tensor goes
// as dtype, shape and raw bytes (host tensors only); inside a process nothing is serialized and
// tensors are shared. Include only from .cpp files.
#pragma once

#include <caf/meta/type_name.hpp>

#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "protocol/messages.hpp"

namespace troupe {

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, tensor& x) {
  std::uint8_t type = static_cast<std::uint8_t>(x.type());
  shape_t shape = x.shape();
  std::vector<char> bytes;
  if constexpr (Inspector::reads_state) {
    if (x.defined() && x.where().kind != device_kind::cpu) {
      if constexpr (std::is_same_v<typename Inspector::result_type, void>)
        return f(caf::meta::type_name("tensor"), type, shape, bytes);  // printing: the shape without the bytes
      else
        return caf::make_error(caf::sec::invalid_argument,
                               "a GPU tensor cannot cross a process boundary (remote edges need a CPU graph)");
    }
    if (x.defined()) bytes.assign(static_cast<const char*>(x.raw()), static_cast<const char*>(x.raw()) + x.nbytes());
    return f(caf::meta::type_name("tensor"), type, shape, bytes);
  } else {
    if (auto err = f(caf::meta::type_name("tensor"), type, shape, bytes)) return err;
    if (bytes.empty() && shape.empty()) {
      x = tensor();
      return {};
    }
    tensor t = tensor::empty(shape, static_cast<dtype>(type));
    if (type > static_cast<std::uint8_t>(dtype::i64) || t.nbytes() != bytes.size())
      return caf::make_error(caf::sec::invalid_argument, "tensor payload does not match its shape and dtype");
    std::memcpy(t.raw(), bytes.data(), bytes.size());
    x = std::move(t);
    return {};
  }
}

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, sampling_params& x) {
  return f(caf::meta::type_name("sampling_params"), x.temperature, x.top_k, x.top_p, x.repetition_penalty, x.seed);
}

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, step_plan& x) {
  return f(caf::meta::type_name("step_plan"), x.step, x.sequences, x.first_position, x.num_tokens, x.tokens, x.sampling,
           x.draft_tokens, x.draft_probs, x.draft_model, x.want_hidden, x.hidden_rows, x.target_hidden);
}

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, hidden_batch& x) {
  return f(caf::meta::type_name("hidden_batch"), x.plan, x.hidden);
}

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, expert_batch& x) {
  return f(caf::meta::type_name("expert_batch"), x.block, x.experts, x.counts, x.x);
}

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, step_result& x) {
  return f(caf::meta::type_name("step_result"), x.step, x.sequences, x.tokens, x.drafted, x.accepted, x.draft_model,
           x.hidden_rows, x.hidden);
}

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, generate_request& x) {
  return f(caf::meta::type_name("generate_request"), x.id, x.prompt, x.sampling, x.max_tokens, x.stop_on_eos,
           x.draft_tokens);
}

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, request_done& x) {
  return f(caf::meta::type_name("request_done"), x.id, x.reason, x.error, x.prompt_tokens, x.completion_tokens,
           x.time_to_first_token_s, x.total_s, x.draft_rounds, x.drafted_tokens, x.accepted_tokens);
}

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, draft_metrics& x) {
  return f(caf::meta::type_name("draft_metrics"), x.draft, x.rounds, x.drafted, x.accepted);
}

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, scheduler_metrics& x) {
  return f(caf::meta::type_name("scheduler_metrics"), x.waiting, x.running, x.kv_blocks_used, x.kv_blocks_total,
           x.requests_finished, x.requests_failed, x.requests_rejected, x.requests_cancelled, x.prompt_tokens,
           x.generated_tokens, x.steps, x.mean_time_to_first_token_s, x.mean_inter_token_s,
           x.speculation_off_switches, x.drafts);
}

}  // namespace troupe
