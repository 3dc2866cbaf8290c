// Text generation for one request on a model: prefill, then decode token by token until EOS,
// a stop string or the token limit, streaming text as it becomes final.
// Invariant: streamed text never contains a stop string or half a UTF-8 character, and the
// concatenation of the streamed pieces equals the final text.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "model/sampler.hpp"

namespace troupe {

class model;
class tokenizer;

struct generation_params {
  sampling_params sampling;
  std::int32_t max_tokens = 128;
  std::vector<std::string> stop;  // stop strings (not included in the output)
  bool stop_on_eos = true;
};

enum class finish_reason : std::uint8_t { eos, stop_string, length };
const char* to_string(finish_reason r);

struct generation_result {
  std::vector<std::int32_t> ids;  // generated ids (the stop string's tokens included)
  std::string text;
  finish_reason reason = finish_reason::length;
  std::int64_t prompt_tokens = 0;
  double prefill_seconds = 0, decode_seconds = 0;
};

/// Called with each newly final piece of text and the id that completed it.
using text_callback = std::function<void(std::string_view text, std::int32_t id)>;

generation_result generate(model& m, const tokenizer& tok, const std::vector<std::int32_t>& prompt,
                           const generation_params& params, const text_callback& on_text = {});

/// Greedy continuations of `prompts` decoded together, as continuous batching runs them: one
/// prefill forward for all, then one forward per step for every sequence still decoding. Each
/// continuation holds up to `max_tokens` ids, ending at the first EOS (kept) when `stop_on_eos`;
/// on the CPU each equals generate()'s at temperature 0 for that prompt alone.
std::vector<std::vector<std::int32_t>> generate_greedy_batch(model& m, const std::vector<std::vector<std::int32_t>>& prompts,
                                                             std::int32_t max_tokens, bool stop_on_eos);

}  // namespace troupe
