// Speculative decoding through the serving graph (draft actor -> embedding -> stages -> head,
// continuous batching), against the same graph with drafting off (requests with
// draft_tokens = 0), at batch 1, 8 and 32: total generated tokens/s and the mean acceptance
// length from the requests' own usage. Greedy. On the CPU every speculative output must equal
// the baseline's, else the run is void; on a GPU a verification of k + 1 >= 5 rows rounds in
// bf16 on tensor cores where a decode step does not, so a near-tie may flip: the count of
// identical outputs is reported instead.
//   troupe_bench_graph_speculative TARGET_DIR DRAFT_DIR [--tokens N] [--threads T] [--device D] [--k K...]
#include <CLI/CLI.hpp>
#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/io/middleman.hpp>
#include <caf/scoped_actor.hpp>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <vector>

#include "actors/compute.hpp"
#include "graph/inference_graph.hpp"
#include "protocol/type_registry.hpp"
#include "tokenizer/tokenizer.hpp"

using namespace troupe;

namespace {

const char* prompts_text[] = {"In the beginning", "And the LORD said unto Moses", "A hacker is", "Blessed are",
                              "The kernel", "And it came to pass", "Q: What is", "Thou shalt"};

struct batch_run {
  double seconds = 0;
  std::map<std::string, std::vector<std::int32_t>> tokens;
  std::int64_t generated = 0, rounds = 0, accepted = 0;
};

batch_run run_batch(caf::actor_system& sys, inference_graph& g, const std::vector<generate_request>& reqs) {
  caf::scoped_actor self{sys};
  batch_run out;
  const auto t0 = std::chrono::steady_clock::now();
  std::size_t open = 0;
  for (const auto& r : reqs)
    self->request(g.scheduler, std::chrono::seconds(30), generate_atom::value, r, caf::actor_cast<caf::actor>(self))
        .receive([&](bool) { ++open; }, [&](caf::error& e) { std::fprintf(stderr, "%s\n", sys.render(e).c_str()); });
  while (open > 0)
    self->receive([&](token_atom, std::string& id, std::int32_t t) { out.tokens[id].push_back(t); },
                  [&](done_atom, request_done& d) {
                    out.generated += d.completion_tokens;
                    out.rounds += d.draft_rounds;
                    out.accepted += d.accepted_tokens;
                    --open;
                  });
  out.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Speculative decoding through the serving graph against the same graph with drafting off"};
  std::string target_dir, draft_dir, device = "cpu";
  int tokens = 64, threads = 1;
  std::vector<int> ks{1, 3};
  app.add_option("target", target_dir, "the target model directory")->required();
  app.add_option("draft", draft_dir, "the draft model directory")->required();
  app.add_option("--tokens", tokens, "tokens generated per request")->capture_default_str();
  app.add_option("--threads", threads, "CPU threads (cpu only)")->capture_default_str();
  app.add_option("--device", device, "cpu or cuda[:N]")->capture_default_str();
  app.add_option("--k", ks, "draft lengths to measure")->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  const bool exact = device == "cpu";
  caf::actor_system_config cfg;
  add_message_types(cfg);
  cfg.load<caf::io::middleman>();
  caf::actor_system sys{cfg};
  auto compute = load_compute(target_dir, threads, device);
  const tokenizer tok = tokenizer::load(target_dir + "/tokenizer.json");
  std::printf("# %s with draft %s on %s, greedy, %d tokens per request, %d thread(s); speedup against the same graph\n"
              "# with drafting off; acceptance = drafts accepted per verification round\n",
              target_dir.c_str(), draft_dir.c_str(), device.c_str(), tokens, threads);
  std::printf("%-22s %-6s %-12s %-9s %-16s %s\n", "policy", "batch", "tok/s", "speedup", "acceptance", exact ? "" : "output");
  // "always": drafting never switches off; "adaptive": the defaults (off below one accepted
  // draft per round over 8 rounds, retried after 32 plain steps; no drafting in steps of more
  // than 4 sequences).
  for (const bool adaptive : {false, true}) {
    const char* policy = adaptive ? "adaptive" : "always";
    topology topo = local_topology(compute->net->config());
    topo.speculation.draft = draft_dir;
    if (!adaptive) {
      topo.speculation.policy.retry_after = 0;
      topo.speculation.policy.max_batch = 0;
    }
    auto graph = inference_graph::start(sys, compute, topo);
    for (int n : {1, 8, 32}) {
      auto make = [&](int k) {
        std::vector<generate_request> reqs;
        for (int i = 0; i < n; ++i) {
          generate_request r;
          r.id = "r" + std::to_string(i);
          r.prompt = tok.encode(prompts_text[i % 8], special_tokens::parse);
          r.prompt.push_back(static_cast<std::int32_t>(100 + i));  // distinct prompts
          r.sampling.temperature = 0;
          r.max_tokens = tokens;
          r.stop_on_eos = false;
          r.draft_tokens = k;
          reqs.push_back(r);
        }
        return reqs;
      };
      run_batch(sys, graph, make(0));  // warm-up
      const auto base = run_batch(sys, graph, make(0));
      for (int k : ks) {
        const auto spec = run_batch(sys, graph, make(k));
        int identical = 0;
        for (const auto& [id, ids] : base.tokens) identical += spec.tokens.count(id) && spec.tokens.at(id) == ids;
        if (exact && identical != n) {
          std::fprintf(stderr, "output differs with k=%d at batch %d: void\n", k, n);
          return 1;
        }
        const std::string label = std::string(policy) + " k=" + std::to_string(k);
        const std::string acceptance =
            spec.rounds ? std::to_string(static_cast<double>(spec.accepted) / static_cast<double>(spec.rounds)).substr(0, 4)
                        : "- (no drafting)";
        std::printf("%-22s %-6d %-12.0f %-9s %-16s %s\n", label.c_str(), n, spec.generated / spec.seconds,
                    (std::to_string(base.seconds / spec.seconds).substr(0, 4) + "x").c_str(), acceptance.c_str(),
                    exact ? "" : (std::to_string(identical) + "/" + std::to_string(n) + " identical").c_str());
      }
      std::printf("%-22s %-6d %-12.0f %-9s %s\n", (std::string(policy) + " baseline").c_str(), n,
                  base.generated / base.seconds, "1.00x", "-");
    }
    graph.stop(sys);
  }
  return 0;
}
