// `troupe distill`: a distillation set for training a draft model. Prompts are spans of the
// given text (shuffled by a seed, the training data's own sequences), the model continues each
// greedily (decoded in batches, as continuous batching runs them) and every prompt with its
// continuation becomes one document of a 1-D int32 .npy, documents separated by EOS: a
// `data.paths` entry that `troupe train` reads as ids, as they are. A draft trained on the
// target's own greedy choices learns what verification will accept.
#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>

#include "cli/commands.hpp"
#include "gpu/make_backend.hpp"
#include "model/generator.hpp"
#include "model/model.hpp"
#include "model/npy.hpp"
#include "protocol/errors.hpp"
#include "tokenizer/tokenizer.hpp"
#include "training/dataset.hpp"

namespace troupe::cli {
namespace fs = std::filesystem;
namespace {

struct distill_opts {
  std::string model, out, device = "cpu", tables = "host";
  std::vector<std::string> data;
  std::int64_t prompts = 1024, prompt_tokens = 16, batch = 32;
  std::int32_t max_tokens = 128;
  std::uint64_t seed = 1;
  int threads = 0;
};

int run_distill(const distill_opts& o) {
  if (o.prompts < 1 || o.prompt_tokens < 1 || o.batch < 1 || o.max_tokens < 1)
    throw input_error("--prompts, --prompt-tokens, --batch and --max-tokens must be at least 1");
  const fs::path out(o.out);
  if (out.extension() != ".npy") throw input_error("--out must name a .npy file, got " + o.out);
  auto be = make_backend(o.device, o.threads);
  auto m = model::load(o.model, *be, parse_table_placement(o.tables));
  const tokenizer tok = tokenizer::load(fs::path(o.model) / "tokenizer.json");
  const std::int32_t eos = m->config().eos_token_id;
  train::corpus_options co;
  for (const auto& d : o.data) co.sources.emplace_back(d);
  co.seq_len = o.prompt_tokens;
  const auto corpus = train::token_corpus::build(co, tok, eos);
  if (corpus.num_train_sequences() < o.prompts)
    throw input_error("the data holds " + std::to_string(corpus.num_train_sequences()) + " spans of " +
                      std::to_string(o.prompt_tokens) + " tokens, fewer than --prompts " + std::to_string(o.prompts));
  train::sequence_order order(corpus.num_train_sequences(), o.seed);

  std::vector<std::int32_t> ids;
  std::int64_t generated = 0;
  const auto t0 = std::chrono::steady_clock::now();
  for (std::int64_t first = 0; first < o.prompts; first += o.batch) {
    std::vector<std::vector<std::int32_t>> prompts;
    for (std::int64_t i = first; i < std::min(o.prompts, first + o.batch); ++i) {
      const auto span = corpus.train_sequence(order.next());
      prompts.emplace_back(span.begin(), span.begin() + o.prompt_tokens);
    }
    const auto continuations = generate_greedy_batch(*m, prompts, o.max_tokens, true);
    for (std::size_t i = 0; i < prompts.size(); ++i) {
      ids.insert(ids.end(), prompts[i].begin(), prompts[i].end());
      ids.insert(ids.end(), continuations[i].begin(), continuations[i].end());
      if (continuations[i].back() != eos) ids.push_back(eos);
      generated += static_cast<std::int64_t>(continuations[i].size());
    }
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::fprintf(stderr, "\r[distill] %lld/%lld prompts, %lld tokens generated (%.0f tok/s)",
                 static_cast<long long>(first + static_cast<std::int64_t>(prompts.size())),
                 static_cast<long long>(o.prompts), static_cast<long long>(generated), static_cast<double>(generated) / s);
  }
  tensor t = tensor::empty({static_cast<std::int64_t>(ids.size())}, dtype::i32);
  std::copy(ids.begin(), ids.end(), t.data<std::int32_t>());
  if (out.has_parent_path()) fs::create_directories(out.parent_path());
  write_npy(out, t);
  std::fprintf(stderr, "\n[distill] wrote %s: %lld prompts, %zu ids\n", o.out.c_str(), static_cast<long long>(o.prompts),
               ids.size());
  return 0;
}

}  // namespace

void add_distill_command(CLI::App& app, std::function<int()>& run) {
  auto o = std::make_shared<distill_opts>();
  auto* d = app.add_subcommand("distill",
                               "Write a distillation set for a draft model: the model's greedy continuations of "
                               "prompts cut from text, as token ids (.npy) that `troupe train` reads as data");
  d->add_option("--model", o->model, "the target model directory (its tokenizer.json cuts the prompts)")->required();
  d->add_option("--data", o->data, "text files or folders the prompts are cut from (the training data's format)")
      ->required();
  d->add_option("--out", o->out, "the .npy to write (int32 ids, documents separated by EOS)")->required();
  d->add_option("--prompts", o->prompts, "how many prompts")->capture_default_str();
  d->add_option("--prompt-tokens", o->prompt_tokens, "tokens per prompt")->capture_default_str();
  d->add_option("--max-tokens", o->max_tokens, "most tokens generated per prompt (stops at EOS)")->capture_default_str();
  d->add_option("--batch", o->batch, "sequences decoded together")->capture_default_str();
  d->add_option("--seed", o->seed, "picks which spans become prompts")->capture_default_str();
  d->add_option("--device", o->device, "cpu, or cuda[:N] where the CUDA backend is built")->capture_default_str();
  d->add_option("--tables", o->tables, "host or device: where the embedding and n-gram tables live")->capture_default_str();
  d->add_option("--threads", o->threads, "CPU threads for matrix products; 0 = all cores")->capture_default_str();
  d->callback([&run, o] { run = [o] { return run_distill(*o); }; });
}

}  // namespace troupe::cli
