// Speculative decoding against plain batched decoding, at batch 1 (each of eight prompts alone
// in turn), 8 and 32, on one device: the same prompts, greedy, the same number of tokens per
// sequence. The plain baseline is
// generate_greedy_batch (one target forward per step for every sequence, as continuous
// batching does); speculation runs generate_speculative_batch with the default policy (adaptive:
// off below the acceptance threshold and in rounds of more than max_batch sequences) and always
// on. Then, at batch 1, what a round is made of: one target step (1 row), one
// verification forward (k + 1 rows), one draft step, and k greedy draft steps chained in one
// call against one call per step, each timed alone. Every figure is the
// second of two runs (the first records the CUDA graphs of each step shape).
// On the CPU every speculative output must equal the plain one (greedy), else the run is void;
// on a GPU a (k+1)-row forward rounds differently from a 1-row one (bf16), so a near-tie may
// flip: the count of identical sequences is reported instead.
//   troupe_bench_speculative TARGET_DIR DRAFT_DIR [--tokens N] [--k K] [--device D] [--tables T]
#include <CLI/CLI.hpp>

#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "gpu/make_backend.hpp"
#include "model/generator.hpp"
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

// Seconds of the second of two runs of `run`: the first records the step shapes a GPU replays
// (each CUDA graph is captured on first use), which is warm-up, not decoding.
template <typename F>
double warm_seconds(F&& run) {
  run();
  const auto t0 = std::chrono::steady_clock::now();
  run();
  return seconds_since(t0);
}

// Mean seconds of one forward of `rows` new tokens after `prompt`, rolled back after each so
// every forward sees the same cache (the verification's shape: rows = k + 1).
double forward_seconds(model& m, const std::vector<std::int32_t>& prompt, std::int64_t rows, int iterations) {
  sequence_state state;
  const step_input first{&state, prompt};
  m.forward({&first, 1}, logits_mode::last_token);
  const std::int64_t base = state.num_tokens;
  const ngram_context ngram = state.ngram;
  const std::vector<std::int32_t> tokens(static_cast<std::size_t>(rows), prompt.back());
  const auto mode = rows == 1 ? logits_mode::last_token : logits_mode::all_tokens;
  auto t0 = std::chrono::steady_clock::now();
  for (int i = -2; i < iterations; ++i) {  // two warm-up forwards (recording)
    if (i == 0) t0 = std::chrono::steady_clock::now();
    const step_input in{&state, tokens};
    m.forward({&in, 1}, mode);
    roll_back(state, base, ngram);
  }
  return seconds_since(t0) / iterations;
}

// Mean seconds of drafting k greedy tokens after `prompt` (rolled back after each): as one
// draft_greedy call (`chained`: on a GPU one replay) or as k calls of one step each.
double draft_seconds(model& m, const std::vector<std::int32_t>& prompt, std::int64_t k, bool chained, int iterations) {
  sequence_state state;
  const step_input first{&state, prompt};
  m.forward({&first, 1}, logits_mode::last_token);
  const std::int64_t base = state.num_tokens;
  const ngram_context ngram = state.ngram;
  auto t0 = std::chrono::steady_clock::now();
  for (int i = -2; i < iterations; ++i) {  // two warm-up rounds (recording)
    if (i == 0) t0 = std::chrono::steady_clock::now();
    std::vector<std::int32_t> feed{prompt.back()};
    for (std::int64_t j = 0; j < (chained ? 1 : k); ++j) {
      const step_input in{&state, feed};
      feed = m.draft_greedy({&in, 1}, chained ? k : 1).front();
    }
    roll_back(state, base, ngram);
  }
  return seconds_since(t0) / iterations;
}

// Where a GPU run's speculative sequence first left the plain one: the plain run's logits at
// that token (decoded as plain decoding does), and by how much its pick led the speculative
// one's. A margin at bf16 rounding's scale is a near-tie that the (k+1)-row verification, its
// GEMMs on tensor cores, rounded the other way.
void report_divergence(model& m, const std::vector<std::int32_t>& prompt, const std::vector<std::int32_t>& plain,
                       const std::vector<std::int32_t>& speculative, int sequence) {
  std::size_t at = 0;
  while (at < plain.size() && at < speculative.size() && plain[at] == speculative[at]) ++at;
  if (at == plain.size()) return;
  sequence_state state;
  std::vector<std::int32_t> feed = prompt;
  tensor logits;
  for (std::size_t i = 0; i <= at; ++i) {
    const step_input in{&state, feed};
    logits = m.forward({&in, 1}, logits_mode::last_token);
    feed.assign(1, plain[i]);
  }
  const float* row = logits.data<float>();
  std::printf("  sequence %d leaves the plain text at token %zu: plain %d (logit %.4f) against speculative %d (%.4f)\n",
              sequence, at, plain[at], row[plain[at]], speculative[at], row[speculative[at]]);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Speculative decoding against plain batched decoding at batch 1, 8 and 32"};
  std::string target_dir, draft_dir, device = "cpu", tables = "host";
  int tokens = 64, threads = 1;
  std::int64_t k = 3;
  app.add_option("target", target_dir, "target model directory")->required();
  app.add_option("draft", draft_dir, "draft model directory (same vocabulary)")->required();
  app.add_option("--tokens", tokens, "tokens per sequence")->capture_default_str();
  app.add_option("--k", k, "tokens the draft proposes per round")->capture_default_str();
  app.add_option("--device", device, "cpu or cuda[:N]")->capture_default_str();
  app.add_option("--threads", threads, "CPU threads (cpu only)")->capture_default_str();
  app.add_option("--tables", tables, "host or device: where both models' tables live")->capture_default_str();
  CLI11_PARSE(app, argc, argv);

  auto be = make_backend(device, threads);
  auto target = model::load(target_dir, *be, parse_table_placement(tables));
  auto draft = model::load(draft_dir, *be, parse_table_placement(tables));
  const tokenizer tok = tokenizer::load(target_dir + "/tokenizer.json");
  const bool exact = device == "cpu";
  std::printf("%-6s %-16s %-26s %-26s %-24s %s\n", "batch", "plain tok/s", "speculative (adaptive)",
              "speculative (always on)", "mean acceptance length", exact ? "" : "identical to plain");
  for (int batch : {1, 8, 32}) {
    // Batch 1 decodes each of the eight prompts alone in turn (acceptance depends on the text);
    // larger batches decode the prompts together (continuous batching).
    const std::size_t groups = batch == 1 ? 8 : 1;
    std::vector<std::vector<std::vector<std::int32_t>>> prompts(groups);
    std::vector<std::vector<generation_params>> params(groups);
    for (std::size_t g = 0; g < groups; ++g)
      for (int i = 0; i < batch; ++i) {
        prompts[g].push_back(tok.encode(prompts_text[(g + static_cast<std::size_t>(i)) % 8]));
        generation_params p;
        p.sampling.temperature = 0;
        p.max_tokens = tokens;
        p.stop_on_eos = false;
        params[g].push_back(p);
      }
    const double total = static_cast<double>(groups) * batch * tokens;
    std::vector<std::vector<std::vector<std::int32_t>>> reference(groups);
    const double plain_tps = total / warm_seconds([&] {
      for (std::size_t g = 0; g < groups; ++g) reference[g] = generate_greedy_batch(*target, prompts[g], tokens, false);
    });
    double rates[2], acceptance = 0;
    int identical = 0;
    for (int mode = 0; mode < 2; ++mode) {
      speculation_config config;
      config.draft_tokens = k;
      if (mode == 1) config.retry_after = config.max_batch = 0;  // never switch off, whatever the batch
      std::vector<std::vector<speculation_stats>> stats(groups);
      std::vector<std::vector<generation_result>> results(groups);
      rates[mode] = total / warm_seconds([&] {
        for (std::size_t g = 0; g < groups; ++g)
          results[g] = generate_speculative_batch(*target, *draft, tok, prompts[g], params[g], config, stats[g]);
      });
      identical = 0;
      std::int64_t rounds = 0, accepted = 0;
      for (std::size_t g = 0; g < groups; ++g)
        for (std::size_t i = 0; i < prompts[g].size(); ++i) {
          const bool same = results[g][i].ids == reference[g][i];
          identical += same;
          if (exact && !same) {
            std::fprintf(stderr, "speculative output differs from plain decoding on the CPU: void\n");
            return 1;
          }
          if (mode == 1 && batch == 1 && !same)
            report_divergence(*target, prompts[g][i], reference[g][i], results[g][i].ids, static_cast<int>(g));
          rounds += stats[g][i].rounds;
          accepted += stats[g][i].accepted;
        }
      if (mode == 1) acceptance = rounds ? static_cast<double>(accepted) / static_cast<double>(rounds) : 0;
    }
    char a[64], b[64], same[32] = "";
    std::snprintf(a, sizeof a, "%.0f (%.2fx)", rates[0], rates[0] / plain_tps);
    std::snprintf(b, sizeof b, "%.0f (%.2fx)", rates[1], rates[1] / plain_tps);
    if (!exact) std::snprintf(same, sizeof same, "%d/%d", identical, static_cast<int>(groups) * batch);
    std::printf("%-6d %-16.0f %-26s %-26s %-24.2f %s\n", batch, plain_tps, a, b, acceptance, same);
  }
  const auto prompt = tok.encode(prompts_text[0]);
  const double step = forward_seconds(*target, prompt, 1, 50), verify = forward_seconds(*target, prompt, k + 1, 50),
               draft_step = forward_seconds(*draft, prompt, 1, 50);
  const double drafts_chained = draft_seconds(*draft, prompt, k, true, 50), drafts_single = draft_seconds(*draft, prompt, k, false, 50);
  std::printf("batch 1, one forward: target step %.3f ms, verification of %lld rows %.3f ms (%.2f steps), draft step "
              "%.3f ms (%.3f steps)\n",
              step * 1e3, static_cast<long long>(k + 1), verify * 1e3, verify / step, draft_step * 1e3, draft_step / step);
  std::printf("batch 1, %lld greedy draft steps: in one draft_greedy call %.3f ms (%.2f target steps), one call per step "
              "%.3f ms (%.2f target steps): %.2fx\n",
              static_cast<long long>(k), drafts_chained * 1e3, drafts_chained / step, drafts_single * 1e3, drafts_single / step,
              drafts_single / drafts_chained);
  return 0;
}
