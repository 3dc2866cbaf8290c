#include "model/generator.hpp"

#include <algorithm>

#include "model/model.hpp"
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
  stream_decoder decoder(tok);
  std::vector<std::int32_t> context = prompt;
  std::size_t longest_stop = 0;
  for (const auto& s : params.stop) longest_stop = std::max(longest_stop, s.size());
  std::size_t emitted = 0;  // bytes of result.text already streamed

  auto emit_until = [&](std::size_t end, std::int32_t id) {
    if (end > emitted && on_text) on_text(std::string_view(result.text).substr(emitted, end - emitted), id);
    emitted = std::max(emitted, end);
  };

  const auto t0 = clock::now();
  std::vector<std::int32_t> step_tokens = prompt;
  for (std::int32_t n = 0; n < params.max_tokens; ++n) {
    const step_input in{&state, step_tokens};
    const tensor logits = m.forward({&in, 1}, logits_mode::last_token);
    if (n == 0) result.prefill_seconds = std::chrono::duration<double>(clock::now() - t0).count();
    const std::int32_t id = pick.sample({logits.data<float>(), static_cast<std::size_t>(logits.dim(1))}, context);
    result.ids.push_back(id);
    context.push_back(id);
    if (params.stop_on_eos && id == m.config().eos_token_id) {
      result.reason = finish_reason::eos;
      break;
    }
    result.text += decoder.push(id);
    bool stopped = false;
    for (const auto& s : params.stop) {
      if (s.empty()) continue;
      // A match may straddle the streamed part by at most s.size() - 1 bytes.
      const auto pos = result.text.find(s, emitted >= s.size() ? emitted - s.size() + 1 : 0);
      if (pos != std::string::npos && pos < result.text.size()) {
        result.text.resize(pos);
        stopped = true;
      }
    }
    if (stopped) {
      emit_until(result.text.size(), id);
      result.reason = finish_reason::stop_string;
      break;
    }
    // Hold back what could still turn out to be the start of a stop string.
    const std::size_t hold = longest_stop ? longest_stop - 1 : 0;
    std::size_t safe = result.text.size() > hold ? result.text.size() - hold : 0;
    while (safe > emitted && safe < result.text.size() && (static_cast<unsigned char>(result.text[safe]) & 0xc0) == 0x80)
      --safe;
    emit_until(safe, id);
    step_tokens.assign(1, id);
  }
  if (result.reason != finish_reason::stop_string) {
    result.text += decoder.flush();
    emit_until(result.text.size(), result.ids.empty() ? -1 : result.ids.back());
  }
  result.decode_seconds = std::chrono::duration<double>(clock::now() - t0).count() - result.prefill_seconds;
  return result;
}

}  // namespace troupe
