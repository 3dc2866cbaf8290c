// `troupe init-model`, `troupe generate` and `troupe logits`.
#include <CLI/CLI.hpp>
#include <simdjson.h>

#include <filesystem>
#include <iostream>

#include "cli/commands.hpp"
#include "gpu/make_backend.hpp"
#include "model/config.hpp"
#include "model/generator.hpp"
#include "model/init_model.hpp"
#include "model/model.hpp"
#include "model/npy.hpp"
#include "model/speculative.hpp"
#include "protocol/errors.hpp"
#include "tokenizer/tokenizer.hpp"

namespace troupe::cli {
namespace fs = std::filesystem;
namespace {

std::vector<std::int32_t> read_ids_file(const std::string& path) {
  simdjson::dom::parser parser;
  simdjson::padded_string text;
  if (simdjson::padded_string::load(path).get(text)) throw input_error(path + ": cannot read");
  simdjson::dom::array arr;
  if (parser.parse(text).get_array().get(arr)) throw input_error(path + ": expected a JSON array of token ids");
  std::vector<std::int32_t> ids;
  for (auto v : arr) {
    std::int64_t id;
    if (v.get_int64().get(id) || id < 0 || id > INT32_MAX) throw input_error(path + ": token ids must be non-negative integers");
    ids.push_back(static_cast<std::int32_t>(id));
  }
  if (ids.empty()) throw input_error(path + ": no token ids");
  return ids;
}

fs::path model_tokenizer(const std::string& model_dir, const std::string& override_path) {
  if (!override_path.empty()) return override_path;
  const fs::path p = fs::path(model_dir) / "tokenizer.json";
  if (!fs::exists(p)) throw input_error(model_dir + " has no tokenizer.json; name one with --tokenizer");
  return p;
}

}  // namespace

void add_model_commands(CLI::App& app, std::function<int()>& run) {
  // init-model
  struct init_opts {
    std::string config, out, tokenizer = TROUPE_DEFAULT_TOKENIZER, type = "bf16";
    std::uint64_t seed = 0;
    double shard_mb = 2048;
  };
  auto io = std::make_shared<init_opts>();
  auto* init = app.add_subcommand("init-model", "Write a model directory with random weights in the released key layout");
  init->add_option("--config", io->config, "model config.json (see configs/models/)")->required()->check(CLI::ExistingFile);
  init->add_option("--out", io->out, "output model directory")->required();
  init->add_option("--seed", io->seed, "random seed (same seed, same bytes)")->capture_default_str();
  init->add_option("--tokenizer", io->tokenizer, "tokenizer file copied into the model as tokenizer.json")
      ->capture_default_str();
  init->add_option("--dtype", io->type, "weight dtype: bf16, f16 or f32 (the router stays f32)")
      ->check(CLI::IsMember({"bf16", "f16", "f32"}))->capture_default_str();
  init->add_option("--max-shard-mb", io->shard_mb, "split safetensors past this size (MB)")->capture_default_str();
  init->callback([&run, io] {
    run = [io] {
      init_options o;
      o.seed = io->seed;
      o.weight_type = io->type == "f32" ? dtype::f32 : io->type == "f16" ? dtype::f16 : dtype::bf16;
      o.max_shard_bytes = static_cast<std::uint64_t>(io->shard_mb * 1e6);
      o.tokenizer_file = io->tokenizer;
      init_model(load_model_config(io->config), io->out, o);
      return 0;
    };
  });

  // generate
  struct gen_opts {
    std::string model = "models/demo", prompt, tokenizer, topology, draft, device = "cpu", tables = "host";
    generation_params params;
    int threads = 0;
    speculation_config speculation;
    bool quiet = false;
  };
  auto go = std::make_shared<gen_opts>();
  go->params.sampling.temperature = 0.8f;
  auto* gen = app.add_subcommand("generate", "Generate text from a prompt, streaming it as it is produced");
  gen->add_option("--model", go->model, "model directory (config.json, safetensors, tokenizer.json)")->capture_default_str();
  gen->add_option("--prompt", go->prompt, "prompt text")->required();
  gen->add_option("--tokenizer", go->tokenizer, "tokenizer file (default: the model's tokenizer.json)");
  gen->add_option("--max-tokens", go->params.max_tokens, "most tokens to generate")->capture_default_str();
  gen->add_option("--temperature", go->params.sampling.temperature, "sampling temperature; 0 = greedy")->capture_default_str();
  gen->add_option("--top-k", go->params.sampling.top_k, "sample among the k most likely tokens; 0 = all")->capture_default_str();
  gen->add_option("--top-p", go->params.sampling.top_p, "nucleus sampling mass")->capture_default_str();
  gen->add_option("--repetition-penalty", go->params.sampling.repetition_penalty, "penalty > 1 for tokens already seen")
      ->capture_default_str();
  gen->add_option("--seed", go->params.sampling.seed, "sampling seed")->capture_default_str();
  gen->add_option("--stop", go->params.stop, "stop string (repeatable); not included in the output");
  gen->add_option("--threads", go->threads, "CPU threads for matrix products; 0 = all cores")->capture_default_str();
  gen->add_option("--device", go->device, "cpu, or cuda[:N] where the CUDA backend is built")->capture_default_str();
  gen->add_option("--tables", go->tables,
                  "where the embedding and n-gram tables live: host (read in place from the checkpoint; on a GPU only "
                  "the gathered rows cross the bus) or device (copied to the device's memory)")
      ->capture_default_str();
  gen->add_flag("--quiet", go->quiet, "do not print timing statistics to stderr");
  gen->add_option("--topology", go->topology,
                  "run through the actor graph of this topology file ('local' for the embedded default)");
  gen->add_option("--draft", go->draft,
                  "speculative decoding with this draft model directory (same vocabulary), e.g. models/demo-draft");
  gen->add_option("--draft-tokens", go->speculation.draft_tokens, "tokens the draft proposes per round")->capture_default_str();
  gen->add_option("--draft-min-acceptance", go->speculation.min_acceptance_length,
                  "turn speculation off when fewer drafts than this are accepted per round (over --draft-window rounds)")
      ->capture_default_str();
  gen->add_option("--draft-window", go->speculation.window, "rounds averaged for that decision")->capture_default_str();
  gen->add_option("--draft-retry-after", go->speculation.retry_after,
                  "plain steps before speculating again; 0 = never turn speculation off")
      ->capture_default_str();
  gen->callback([&run, go] {
    run = [go] {
      const tokenizer tok = tokenizer::load(model_tokenizer(go->model, go->tokenizer));
      const auto prompt = tok.encode(go->prompt, special_tokens::parse);
      if (!go->topology.empty()) {
        if (!go->draft.empty()) throw input_error("--draft does not combine with --topology yet");
        return generate_with_graph(go->model, go->topology, tok, prompt, go->params, go->threads, go->device);
      }
      auto be_owner = make_backend(go->device, go->threads);
      backend& be = *be_owner;
      auto m = model::load(go->model, be, parse_table_placement(go->tables));
      const auto print = [](std::string_view text, std::int32_t) { std::cout << text << std::flush; };
      generation_result result;
      speculation_stats stats;
      if (go->draft.empty()) {
        result = generate(*m, tok, prompt, go->params, print);
      } else {
        auto draft = model::load(go->draft, be, parse_table_placement(go->tables));
        const bool quiet = go->quiet;
        result = generate_speculative(*m, *draft, tok, prompt, go->params, go->speculation, stats, print,
                                      [quiet](const std::string& line) {
                                        if (!quiet) std::cerr << "\n[generate] " << line << "\n";
                                      });
      }
      std::cout << "\n";
      if (!go->quiet && !go->draft.empty())
        std::cerr << "[generate] speculation: " << stats.rounds << " rounds, " << stats.accepted << " of " << stats.drafted
                  << " drafted tokens accepted (mean acceptance length " << stats.mean_acceptance_length() << "), "
                  << stats.plain_steps << " steps without drafting\n";
      if (!go->quiet) {
        const double n = static_cast<double>(result.ids.size());
        std::cerr << "[generate] " << result.prompt_tokens << " prompt tokens in " << result.prefill_seconds * 1e3
                  << " ms; " << result.ids.size() << " tokens in " << result.decode_seconds + result.prefill_seconds
                  << " s (" << (n > 1 ? (n - 1) / result.decode_seconds : 0) << " tok/s decode); finish: "
                  << to_string(result.reason) << "\n";
      }
      return 0;
    };
  });

  // logits
  struct logit_opts {
    std::string model, ids, out, ngram_out, device = "cpu";
    int threads = 0;
    std::size_t chunk = 0;
  };
  auto lo = std::make_shared<logit_opts>();
  auto* logits = app.add_subcommand("logits", "Write the float32 logits of every position of a token sequence as .npy");
  logits->add_option("--model", lo->model, "model directory")->required()->check(CLI::ExistingDirectory);
  logits->add_option("--ids", lo->ids, "JSON file holding one array of token ids")->required()->check(CLI::ExistingFile);
  logits->add_option("--out", lo->out, "output .npy file, shape [tokens, vocab_size]")->required();
  logits->add_option("--chunk", lo->chunk,
                     "feed the sequence in steps of this many tokens (0 = one prefill); the result must not change")
      ->capture_default_str();
  logits->add_option("--threads", lo->threads, "CPU threads; 0 = all cores")->capture_default_str();
  logits->add_option("--device", lo->device, "cpu, or cuda[:N] where the CUDA backend is built")->capture_default_str();
  logits->add_option("--ngram-ids", lo->ngram_out, "also write the n-gram hash ids [tokens, tables] (int64 .npy)");
  logits->callback([&run, lo] {
    run = [lo] {
      auto be = make_backend(lo->device, lo->threads);
      auto m = model::load(lo->model, *be);
      const auto ids = read_ids_file(lo->ids);
      const std::size_t step = lo->chunk ? lo->chunk : ids.size();
      tensor all = tensor::empty({static_cast<std::int64_t>(ids.size()), m->config().vocab_size}, dtype::f32);
      sequence_state state;
      for (std::size_t begin = 0; begin < ids.size(); begin += step) {
        const std::size_t n = std::min(step, ids.size() - begin);
        const step_input in{&state, std::span<const std::int32_t>(ids).subspan(begin, n)};
        const tensor part = m->forward({&in, 1}, logits_mode::all_tokens);  // host logits
        std::copy_n(part.data<float>(), part.numel(), all.data<float>() + static_cast<std::int64_t>(begin) * all.dim(1));
      }
      write_npy(lo->out, all);
      if (!lo->ngram_out.empty()) {
        const auto hashed = m->ngram_ids(ids, {});
        const auto tables = static_cast<std::int64_t>(hashed.size() / ids.size());
        tensor t = tensor::empty({static_cast<std::int64_t>(ids.size()), tables}, dtype::i64);
        std::copy(hashed.begin(), hashed.end(), t.data<std::int64_t>());
        write_npy(lo->ngram_out, t);
      }
      return 0;
    };
  });
}

}  // namespace troupe::cli
