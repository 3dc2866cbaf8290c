// Batch-1 greedy decode on the CUDA backend against the memory-bandwidth roofline of the same
// GPU, measured in the same run:
//   bandwidth   a 1 GiB device-to-device copy (bytes read + written per second);
//   bytes/token every weight a decode step reads (bf16 matrices and kv_b, float32 norms and
//               router), the expected routed experts (moe_topk x n_routed / (n_routed + zero):
//               zero experts cost nothing), the n-gram rows gathered, and the latent KV cache
//               read at the mean position of the run;
//   roofline    bandwidth / bytes per token.
// Batch-1 and batch-8 decode run twice: op by op (the host dispatches every op: the baseline)
// and replayed from CUDA graphs (model::set_recorded_steps). Then the n-gram embedding's share of a decode step (host
// tables: one token's embed(), synchronised, as the step runs it; device tables: the embedding
// recorded alone and replayed back to back, as the step's graph holds it),
// with the tables in host memory (read in place from the mapping; the default) and copied to
// the device, each against its own decode step; total decode tokens/s with 16 and 64
// sequences decoding together, against batch 1; and one sequence's prefill of 2k and 8k tokens.
// With the tables on the device, batch-1 and batch-8 decode also run with the shortcut MoE on the
// step's one stream (cuda_backend::set_concurrent_branches(false)): what its second stream gains.
//   troupe_bench_cuda_decode MODEL_DIR|CONFIG.json [TOKENS] [PROMPT_TOKENS] [--profile [BATCH] | --prefill]
// --profile: only recorded decode steps of BATCH sequences (default 1); --prefill: only one
// prefill of TOKENS tokens after a warm-up one (short runs for ncu: gpu-bundle/profile.sh).
// A config file instead of a model directory: random weights (init-model's, seed 1) are written
// to $TMPDIR/troupe-bench-<name> first, once.
// --profile runs only batch-1 decode replayed from CUDA graphs with the tables on the device
// (the whole step one graph), for a profiler such as ncu to look at.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>

#include "gpu/cuda/cuda_backend.hpp"
#include "gpu/cuda/cuda_check.hpp"
#include "model/config.hpp"
#include "model/init_model.hpp"
#include "model/model.hpp"
#include "model/sampler.hpp"
#include "model/weights.hpp"

using namespace troupe;

namespace {

double copy_bandwidth() {
  const std::size_t bytes = std::size_t(1) << 30;
  void *a = nullptr, *b = nullptr;
  TROUPE_CUDA_CHECK(cudaMalloc(&a, bytes));
  TROUPE_CUDA_CHECK(cudaMalloc(&b, bytes));
  cudaEvent_t start, stop;
  TROUPE_CUDA_CHECK(cudaEventCreate(&start));
  TROUPE_CUDA_CHECK(cudaEventCreate(&stop));
  TROUPE_CUDA_CHECK(cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice));  // warm-up
  TROUPE_CUDA_CHECK(cudaEventRecord(start));
  for (int i = 0; i < 10; ++i) TROUPE_CUDA_CHECK(cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice));
  TROUPE_CUDA_CHECK(cudaEventRecord(stop));
  TROUPE_CUDA_CHECK(cudaEventSynchronize(stop));
  float ms = 0;
  TROUPE_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
  cudaFree(a);
  cudaFree(b);
  return 2.0 * 10 * static_cast<double>(bytes) / (ms * 1e-3);
}

// Bytes one decode step reads at `position` (see the header).
double bytes_per_token(const model_config& c, double position) {
  double matrices = 0, f32 = 0, tables = 0;
  const double routed = static_cast<double>(c.moe_topk) * static_cast<double>(c.n_routed_experts) /
                        static_cast<double>(c.num_router_experts());
  for (const auto& s : weight_specs(c)) {
    double n = 1;
    for (auto d : s.shape) n *= static_cast<double>(d);
    const bool expert = s.name.find(".mlp.experts.") != std::string::npos;
    const bool table = s.name.find("embedders") != std::string::npos || s.name == "model.embed_tokens.weight";
    const bool mtp = s.name.starts_with("model.mtp.");
    if (mtp) continue;
    if (table) {
      tables += static_cast<double>(s.shape.back()) * 2;  // one bf16 row per table per token
    } else if (expert) {
      matrices += n * 2 * routed / static_cast<double>(c.n_routed_experts);
    } else if (s.keep_f32 || s.shape.size() == 1) {
      f32 += n * 4;
    } else {
      matrices += n * 2;
    }
  }
  const double kv = static_cast<double>(2 * c.num_layers) * position * static_cast<double>(c.kv_lora_rank + c.qk_rope_head_dim) * 4;
  return matrices + f32 + tables + kv;
}

// Greedy decode of `batch` sequences together (distinct prompts): generated tokens per second
// over `tokens` steps after the prefill and one warm-up step. Leaves sequence 0's state in `first`.
double decode_rate(model& m, int batch, int tokens, int prompt_tokens, sequence_state* first = nullptr,
                   std::int32_t* last_token = nullptr) {
  const auto vocab = static_cast<std::size_t>(m.config().vocab_size);
  std::vector<sequence_state> states(static_cast<std::size_t>(batch));
  std::vector<std::vector<std::int32_t>> feed(static_cast<std::size_t>(batch));
  for (int b = 0; b < batch; ++b)
    for (int i = 0; i < prompt_tokens; ++i) feed[static_cast<std::size_t>(b)].push_back(3 + (i * 37 + b * 101) % 1000);
  auto step = [&] {
    std::vector<step_input> in;
    for (int b = 0; b < batch; ++b) in.push_back({&states[static_cast<std::size_t>(b)], feed[static_cast<std::size_t>(b)]});
    const tensor logits = m.forward(in, logits_mode::last_token);
    for (int b = 0; b < batch; ++b)
      feed[static_cast<std::size_t>(b)].assign(1, argmax({logits.data<float>() + b * vocab, vocab}));
  };
  step();  // prefill
  step();  // warm-up
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < tokens; ++i) step();
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (first) *first = std::move(states[0]);
  if (last_token) *last_token = feed[0][0];
  return batch * tokens / seconds;
}

// Tokens per second of one sequence's prefill of `tokens` tokens (last-token logits on the host),
// the best of `reps` runs after a warm-up.
double prefill_rate(model& m, int tokens, int reps = 3) {
  std::vector<std::int32_t> prompt;
  for (int i = 0; i < tokens; ++i) prompt.push_back(3 + (i * 37) % 1000);
  double best = 0;
  for (int r = 0; r <= reps; ++r) {
    sequence_state s;
    step_input in{&s, prompt};
    const auto t0 = std::chrono::steady_clock::now();
    m.forward({&in, 1}, logits_mode::last_token);
    const double rate = tokens / std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (r > 0) best = std::max(best, rate);  // r = 0 warms up
  }
  return best;
}

// The model directory the bench reads: `arg` itself, or for a config file a directory of random
// weights made from it (once: a later run finds it).
std::filesystem::path model_dir(const std::filesystem::path& arg) {
  if (arg.extension() != ".json") return arg;
  const auto dir = std::filesystem::temp_directory_path() / ("troupe-bench-" + arg.stem().string());
  if (!std::filesystem::exists(dir / "config.json")) {
    std::printf("# writing random weights for %s to %s\n", arg.c_str(), dir.c_str());
    std::fflush(stdout);
    init_options o;
    o.seed = 1;
    init_model(load_model_config(arg), dir, o);
  }
  return dir;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s MODEL_DIR|CONFIG.json [TOKENS] [PROMPT_TOKENS] [--profile [BATCH] | --prefill]\n", argv[0]);
    return 2;
  }
  const int tokens = argc > 2 ? std::atoi(argv[2]) : 128;
  const int prompt_tokens = argc > 3 ? std::atoi(argv[3]) : 16;
  const std::filesystem::path dir = model_dir(argv[1]);
  cuda_backend be;
  // Short runs for a profiler: recorded decode steps of one batch size, or one prefill of TOKENS
  // tokens (after a warm-up one).
  if (argc > 4 && std::string(argv[4]) == "--profile") {
    const int batch = argc > 5 ? std::atoi(argv[5]) : 1;
    auto m = model::load(dir, be, table_placement::device);
    std::printf("batch-%d decode, CUDA graph, tables on the device: %.1f tok/s\n", batch,
                decode_rate(*m, batch, tokens, prompt_tokens));
    return 0;
  }
  if (argc > 4 && std::string(argv[4]) == "--prefill") {
    auto m = model::load(dir, be, table_placement::host);
    std::printf("prefill of %d tokens: %.0f tok/s\n", tokens, prefill_rate(*m, tokens, 1));
    return 0;
  }
  const double bandwidth = copy_bandwidth();
  for (const auto placement : {table_placement::host, table_placement::device}) {
    const char* where = placement == table_placement::host ? "host" : "device";
    const auto t_load = std::chrono::steady_clock::now();
    auto m = model::load(dir, be, placement);
    be.synchronize();
    const auto& c = m->config();
    std::printf("# %s on %s, tables in %s memory, loaded in %.1f s\n", dir.c_str(), be.name().c_str(), where,
                std::chrono::duration<double>(std::chrono::steady_clock::now() - t_load).count());
    sequence_state s;
    std::int32_t last = 0;
    // Baseline: the same steps dispatched op by op from the host.
    m->set_recorded_steps(false);
    const double op_by_op = decode_rate(*m, 1, tokens, prompt_tokens);
    m->set_recorded_steps(true);
    const double tok_s = decode_rate(*m, 1, tokens, prompt_tokens, &s, &last);
    std::printf("batch-1 decode op by op: %.1f tok/s; replayed as a CUDA graph: %.1f tok/s (x%.2f)\n", op_by_op, tok_s,
                tok_s / op_by_op);
    // One token's embedding (hash, gathers, projections). Host tables: embed() as a decode step
    // calls it before the replay, synchronised. Device tables: the step records it, so it is
    // recorded here alone (the device N-gram hash, gathers, projections) and replayed back to
    // back: its cost inside a step's graph.
    const int reps = 200;
    ngram_context ctx = s.ngram;
    tensor one = tensor::empty({1}, dtype::i32), one_row = tensor::empty({1}, dtype::i64);
    one.data<std::int32_t>()[0] = last;
    one_row.data<std::int64_t>()[0] = last;
    double embed_s = 0;
    if (placement == table_placement::host) {
      const std::vector<std::int64_t> rows{1}, first{s.num_tokens};
      const step_layout layout = step_layout::make(rows, first);
      const auto e0 = std::chrono::steady_clock::now();
      for (int i = 0; i < reps; ++i) {
        ngram_context local = ctx;
        ngram_context* contexts[] = {&local};
        m->embed(one, layout, contexts);
        be.synchronize();
      }
      embed_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - e0).count() / reps;
    } else {
      auto ngram = be.make_device_ngram(c, 1);
      if (ngram) ngram->set(0, ctx.tail);
      const tensor tokens_dev = be.upload(one, dtype::i32), rows_dev = be.upload(one_row, dtype::i64);
      tensor ids = be.empty({std::max<std::int64_t>(1, c.num_ngram_tables()), 1}, dtype::i64);
      auto embedding = be.record([&] { return m->embed_on_device(ngram.get(), tokens_dev, rows_dev, ids); });
      embedding.ops->replay();
      be.synchronize();
      const auto e0 = std::chrono::steady_clock::now();
      for (int i = 0; i < reps; ++i) embedding.ops->replay();
      be.synchronize();
      embed_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - e0).count() / reps;
    }
    if (placement == table_placement::host) {
      const double bytes = bytes_per_token(c, prompt_tokens + 2 + tokens / 2.0);
      const double roofline = bandwidth / bytes;
      std::printf("copy bandwidth %.0f GB/s; %.1f MB read per token; roofline %.0f tok/s\n", bandwidth / 1e9, bytes / 1e6,
                  roofline);
      std::printf("batch-1 decode: %.1f tok/s (%.3f ms/token) = %.1f%% of the roofline\n", tok_s, 1e3 / tok_s,
                  100 * tok_s / roofline);
    } else {
      std::printf("batch-1 decode: %.1f tok/s (%.3f ms/token)\n", tok_s, 1e3 / tok_s);
    }
    if (placement == table_placement::device) {
      // The same steps with the MoE on the step's one stream: a fresh model records them so.
      be.set_concurrent_branches(false);
      auto one_stream = model::load(dir, be, placement);
      const double one1 = decode_rate(*one_stream, 1, tokens, prompt_tokens);
      const double one8 = decode_rate(*one_stream, 8, std::max(8, tokens / 2), prompt_tokens);
      be.set_concurrent_branches(true);
      const double two8 = decode_rate(*m, 8, std::max(8, tokens / 2), prompt_tokens);
      std::printf("MoE beside the block's second half (two streams) vs after it (one stream): batch 1 %.1f vs %.1f tok/s "
                  "(x%.3f), batch 8 %.1f vs %.1f (x%.3f)\n",
                  tok_s, one1, tok_s / one1, two8, one8, two8 / one8);
    }
    std::printf("n-gram embedding (tables in %s memory%s): %.3f ms per token = %.1f%% of a decode step\n", where,
                placement == table_placement::host ? ", before the replay" : ", recorded alone, replayed back to back",
                embed_s * 1e3, 100 * embed_s * tok_s);
    if (placement == table_placement::host) {
      m->set_recorded_steps(false);
      const double op8 = decode_rate(*m, 8, std::max(8, tokens / 2), prompt_tokens);
      m->set_recorded_steps(true);
      const double rec8 = decode_rate(*m, 8, std::max(8, tokens / 2), prompt_tokens);
      std::printf("batch-8 decode: op by op %.1f tok/s, CUDA graph %.1f tok/s in total (x%.2f; x%.2f batch 1)\n", op8, rec8,
                  rec8 / op8, rec8 / tok_s);
    }
    if (placement == table_placement::host)
      for (int n : {2048, 8192})
        if (!c.max_position_embeddings || n <= c.max_position_embeddings)
          std::printf("prefill of %d tokens: %.0f tok/s\n", n, prefill_rate(*m, n, n > 4096 ? 1 : 3));
    if (placement == table_placement::host)
      for (int batch : {16, 64}) {
        const double rate = decode_rate(*m, batch, std::max(8, tokens / 4), prompt_tokens);
        std::printf("batch-%d decode: %.1f tok/s in total (x%.2f batch 1)\n", batch, rate, rate / tok_s);
      }
  }
  return 0;
}
