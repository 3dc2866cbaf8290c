#include "model/generator.hpp"

#include <algorithm>

#include "model/model.hpp"
#include "model/text_stream.hpp"
#include "protocol/errors.hpp"
#include "tokenizer/tokenizer.hpp"

namespace troupe {

const char* to_string(finish_reason r) {
  switch (r) {
    case finish_reason::eos: return "eos";
    case finish_reason::stop_string: return "stop";
    case finish_reason::length: return "length";
  }
  return "?";
}

generation_result generate(model& m, const tokenizer& tok, const std::vector<std::int32_t>& prompt,
                           const generation_params& params, const text_callback& on_text) {
  if (prompt.empty()) throw input_error("the prompt is empty (no tokens)");
  if (params.max_tokens < 0) throw input_error("max_tokens must be >= 0");
  using clock = std::chrono::steady_clock;
  generation_result result;
  result.prompt_tokens = static_cast<std::int64_t>(prompt.size());
  sampler pick(params.sampling);
  sequence_state state;
  text_stream stream(tok, params.stop);
  std::vector<std::int32_t> context = prompt;
  auto emit = [&](const std::string& text, std::int32_t id) {
    if (!text.empty() && on_text) on_text(text, id);
  };

  const auto t0 = clock::now();
  // Greedy without a penalty reads only the argmax: the model picks it where the logits are.
  const bool argmax_only = params.sampling.temperature == 0 && params.sampling.repetition_penalty == 1.0f;
  std::vector<std::int32_t> step_tokens = prompt;
  for (std::int32_t n = 0; n < params.max_tokens; ++n) {
    const step_input in{&state, step_tokens};
    std::int32_t id;
    if (argmax_only) {
      id = m.forward_argmax({&in, 1}, logits_mode::last_token).front();
    } else {
      const tensor logits = m.forward({&in, 1}, logits_mode::last_token);
      id = pick.sample({logits.data<float>(), static_cast<std::size_t>(logits.dim(1))}, context);
    }
    if (n == 0) result.prefill_seconds = std::chrono::duration<double>(clock::now() - t0).count();
    result.ids.push_back(id);
    context.push_back(id);
    if (params.stop_on_eos && id == m.config().eos_token_id) {
      result.reason = finish_reason::eos;
      break;
    }
    const auto update = stream.push(id);
    emit(update.text, id);
    if (update.stopped) {
      result.reason = finish_reason::stop_string;
      break;
    }
    step_tokens.assign(1, id);
  }
  emit(stream.finish(), result.ids.empty() ? -1 : result.ids.back());
  result.text = stream.text();
  result.decode_seconds = std::chrono::duration<double>(clock::now() - t0).count() - result.prefill_seconds;
  return result;
}

std::vector<std::vector<std::int32_t>> generate_greedy_batch(model& m, const std::vector<std::vector<std::int32_t>>& prompts,
                                                             std::int32_t max_tokens, bool stop_on_eos) {
  if (max_tokens < 0) throw input_error("max_tokens must be >= 0");
  for (const auto& p : prompts)
    if (p.empty()) throw input_error("a prompt is empty (no tokens)");
  std::vector<std::vector<std::int32_t>> out(prompts.size());
  std::vector<sequence_state> states(prompts.size());
  std::vector<std::vector<std::int32_t>> feed = prompts;
  std::vector<std::size_t> live;
  if (max_tokens > 0)
    for (std::size_t i = 0; i < prompts.size(); ++i) live.push_back(i);
  while (!live.empty()) {
    std::vector<step_input> in;
    for (const auto i : live) in.push_back({&states[i], feed[i]});
    const auto ids = m.forward_argmax(in, logits_mode::last_token);
    std::vector<std::size_t> still;
    for (std::size_t j = 0; j < live.size(); ++j) {
      const auto i = live[j];
      const std::int32_t id = ids[j];
      out[i].push_back(id);
      feed[i].assign(1, id);
      const bool ended = stop_on_eos && id == m.config().eos_token_id;
      if (!ended && static_cast<std::int32_t>(out[i].size()) < max_tokens) still.push_back(i);
    }
    live = std::move(still);
  }
  return out;
}

}  // namespace troupe
