// Speculative decoding against plain batched decoding, at batch 1, 8 and 32, on one backend:
// the same prompts, greedy, the same number of tokens per sequence. The plain baseline is a
// batched decode loop (one target forward per step for every sequence, as continuous batching
// does); speculation runs generate_speculative_batch with the adaptive policy and always on.
// Every speculative output is checked equal to the plain one (greedy), else the run is void.
//   troupe_bench_speculative TARGET_DIR DRAFT_DIR [TOKENS] [K] [THREADS]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "gpu/cpu/cpu_backend.hpp"
#include "model/model.hpp"
#include "model/speculative.hpp"
#include "tokenizer/tokenizer.hpp"

using namespace troupe;

namespace {

const char* prompts_text[] = {"In the beginning", "And the LORD said unto Moses", "A hacker is", "Blessed are",
                              "The kernel", "And it came to pass", "Q: What is", "Thou shalt"};

double seconds_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

// Greedy batched decoding without speculation: returns each sequence's ids.
std::vector<std::vector<std::int32_t>> plain_batch(model& m, const std::vector<std::vector<std::int32_t>>& prompts, int tokens) {
  std::vector<sequence_state> states(prompts.size());
  std::vector<std::vector<std::int32_t>> out(prompts.size()), feed = prompts;
  for (int t = 0; t < tokens; ++t) {
    std::vector<step_input> in;
    for (std::size_t i = 0; i < prompts.size(); ++i) in.push_back({&states[i], feed[i]});
    const tensor logits = m.forward(in, logits_mode::last_token);
    for (std::size_t i = 0; i < prompts.size(); ++i) {
      const float* row = logits.data<float>() + static_cast<std::int64_t>(i) * logits.dim(1);
      const auto id = argmax({row, static_cast<std::size_t>(logits.dim(1))});
      out[i].push_back(id);
      feed[i].assign(1, id);
    }
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s TARGET_DIR DRAFT_DIR [TOKENS] [K] [THREADS]\n", argv[0]);
    return 2;
  }
  const int tokens = argc > 3 ? std::atoi(argv[3]) : 64;
  const std::int64_t k = argc > 4 ? std::atoll(argv[4]) : 3;
  const int threads = argc > 5 ? std::atoi(argv[5]) : 1;
  cpu_backend be(threads);
  auto target = model::load(argv[1], be);
  auto draft = model::load(argv[2], be);
  const tokenizer tok = tokenizer::load(std::string(argv[1]) + "/tokenizer.json");
  std::printf("%-6s %-16s %-26s %-26s %s\n", "batch", "plain tok/s", "speculative (adaptive)", "speculative (always on)",
              "mean acceptance length");
  for (int batch : {1, 8, 32}) {
    std::vector<std::vector<std::int32_t>> prompts;
    std::vector<generation_params> params;
    for (int i = 0; i < batch; ++i) {
      prompts.push_back(tok.encode(prompts_text[i % 8]));
      generation_params p;
      p.sampling.temperature = 0;
      p.max_tokens = tokens;
      p.stop_on_eos = false;
      params.push_back(p);
    }
    const double total = static_cast<double>(batch) * tokens;
    auto t0 = std::chrono::steady_clock::now();
    const auto reference = plain_batch(*target, prompts, tokens);
    const double plain_tps = total / seconds_since(t0);
    double rates[2], acceptance = 0;
    for (int mode = 0; mode < 2; ++mode) {
      speculation_config config;
      config.draft_tokens = k;
      if (mode == 1) config.retry_after = 0;  // never switch off
      std::vector<speculation_stats> stats;
      t0 = std::chrono::steady_clock::now();
      const auto results = generate_speculative_batch(*target, *draft, tok, prompts, params, config, stats);
      rates[mode] = total / seconds_since(t0);
      for (int i = 0; i < batch; ++i)
        if (results[static_cast<std::size_t>(i)].ids != reference[static_cast<std::size_t>(i)]) {
          std::fprintf(stderr, "speculative output differs from plain decoding (sequence %d): void\n", i);
          return 1;
        }
      if (mode == 1) {
        std::int64_t rounds = 0, accepted = 0;
        for (const auto& s : stats) {
          rounds += s.rounds;
          accepted += s.accepted;
        }
        acceptance = rounds ? static_cast<double>(accepted) / static_cast<double>(rounds) : 0;
      }
    }
    char a[64], b[64];
    std::snprintf(a, sizeof a, "%.0f (%.2fx)", rates[0], rates[0] / plain_tps);
    std::snprintf(b, sizeof b, "%.0f (%.2fx)", rates[1], rates[1] / plain_tps);
    std::printf("%-6d %-16.0f %-26s %-26s %.2f\n", batch, plain_tps, a, b, acceptance);
  }
  return 0;
}
