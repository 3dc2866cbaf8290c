// Prefill and batch-1 decode throughput of the CPU backend on a model directory, with the
// greedy tokens it produced (so a baseline can be checked to compute the same thing).
//   troupe_bench_model MODEL_DIR PROMPT_TOKENS DECODE_TOKENS THREADS
// Prints one JSON object: prefill_tok_s, decode_tok_s, tokens.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "gpu/cpu/cpu_backend.hpp"
#include "model/model.hpp"
#include "model/sampler.hpp"

int main(int argc, char** argv) {
  if (argc != 5) {
    std::fprintf(stderr, "usage: %s MODEL_DIR PROMPT_TOKENS DECODE_TOKENS THREADS\n", argv[0]);
    return 2;
  }
  using clock = std::chrono::steady_clock;
  const int prompt_len = std::atoi(argv[2]), decode_len = std::atoi(argv[3]);
  troupe::cpu_backend be(std::atoi(argv[4]));
  auto m = troupe::model::load(argv[1], be);
  const auto vocab = static_cast<int>(m->config().vocab_size);
  std::vector<std::int32_t> prompt;
  for (int i = 0; i < prompt_len; ++i) prompt.push_back(3 + (i * 7919) % (vocab - 3));

  auto run = [&](std::vector<std::int32_t>& out, double& prefill_s, double& decode_s) {
    troupe::sequence_state s;
    const auto t0 = clock::now();
    troupe::step_input in{&s, prompt};
    troupe::tensor logits = m->forward({&in, 1}, troupe::logits_mode::last_token);
    const auto t1 = clock::now();
    out.assign(1, troupe::argmax({logits.data<float>(), static_cast<std::size_t>(vocab)}));
    for (int i = 1; i < decode_len; ++i) {
      troupe::step_input d{&s, {&out.back(), 1}};
      logits = m->forward({&d, 1}, troupe::logits_mode::last_token);
      out.push_back(troupe::argmax({logits.data<float>(), static_cast<std::size_t>(vocab)}));
    }
    prefill_s = std::chrono::duration<double>(t1 - t0).count();
    decode_s = std::chrono::duration<double>(clock::now() - t1).count();
  };
  std::vector<std::int32_t> tokens;
  double prefill_s = 0, decode_s = 0;
  run(tokens, prefill_s, decode_s);  // warm-up: page in the weights, size the caches
  run(tokens, prefill_s, decode_s);
  std::printf("{\"prefill_tok_s\": %.2f, \"decode_tok_s\": %.2f, \"tokens\": [", prompt_len / prefill_s,
              (decode_len - 1) / decode_s);
  for (std::size_t i = 0; i < tokens.size(); ++i) std::printf("%s%d", i ? ", " : "", tokens[i]);
  std::printf("]}\n");
  return 0;
}
