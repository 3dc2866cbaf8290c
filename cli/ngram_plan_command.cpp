// `troupe ngram-plan`: measures the n-gram hash's collisions on a corpus and recommends
// per-table sizes (model/ngram_plan.hpp), printing tables, optionally writing the sizes into a
// model config and plotting collision share against M/V.
#include <CLI/CLI.hpp>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <thread>

#include "cli/commands.hpp"
#include "cli/svg_plot.hpp"
#include "gpu/cpu/thread_pool.hpp"
#include "model/config.hpp"
#include "model/ngram_plan.hpp"
#include "protocol/errors.hpp"
#include "tokenizer/tokenizer.hpp"

namespace troupe::cli {
namespace fs = std::filesystem;
namespace {

struct plan_opts {
  std::string tokenizer, config, out, plot;
  std::vector<std::string> corpus, eval;
  double ratio = 78;
  int orders = 4, splits = 4, threads = 0;
  std::int64_t vocab = 0;
  double window = 0.01;
  int candidates = 256;
};

std::vector<fs::path> corpus_files(const std::vector<std::string>& paths) {
  std::vector<fs::path> files;
  for (const auto& p : paths) {
    if (fs::is_directory(p)) {
      std::vector<fs::path> found;
      for (const auto& e : fs::recursive_directory_iterator(p))
        if (e.is_regular_file()) found.push_back(e.path());
      std::sort(found.begin(), found.end());
      files.insert(files.end(), found.begin(), found.end());
    } else if (fs::is_regular_file(p)) {
      files.emplace_back(p);
    } else {
      throw input_error("ngram-plan: corpus path " + p + " does not exist");
    }
  }
  return files;
}

// Tokenizes the corpus in chunks (cut at line ends, tokenized in parallel) and collects the
// distinct n-grams; the last N-1 tokens of a chunk are carried into the next so no n-gram
// across a chunk boundary is lost.
std::vector<ngram_set> collect(const plan_opts& o, const tokenizer& tok, std::int64_t vocab, thread_pool& pool) {
  constexpr std::size_t chunk_bytes = 4 << 20;
  const bool show_progress = isatty(2);
  ngram_collector collector(vocab, o.orders);
  std::uint64_t total = 0;
  for (const auto& file : corpus_files(o.corpus)) {
    std::ifstream in(file, std::ios::binary);
    if (!in) throw input_error("ngram-plan: cannot read " + file.string());
    std::vector<std::int32_t> carry;
    std::string pending;
    bool eof = false;
    while (!eof) {
      // Read a batch of chunks, one per thread.
      std::vector<std::string> chunks;
      while (chunks.size() < static_cast<std::size_t>(pool.size()) && !eof) {
        std::string buf(chunk_bytes, '\0');
        in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
        buf.resize(static_cast<std::size_t>(in.gcount()));
        eof = buf.size() < chunk_bytes;
        pending += buf;
        const auto cut = eof ? pending.size() : pending.rfind('\n') + 1;
        if (cut == 0 || cut > pending.size()) continue;  // no line end yet: read on
        chunks.push_back(pending.substr(0, cut));
        pending.erase(0, cut);
        total += cut;
      }
      std::vector<std::vector<std::int32_t>> ids(chunks.size());
      pool.parallel_for(static_cast<std::int64_t>(chunks.size()), [&](std::int64_t b, std::int64_t e) {
        for (std::int64_t i = b; i < e; ++i) ids[static_cast<std::size_t>(i)] = tok.encode(chunks[static_cast<std::size_t>(i)]);
      });
      for (auto& part : ids) {
        carry.insert(carry.end(), part.begin(), part.end());
        collector.add_segment(carry);
        carry.erase(carry.begin(), carry.end() - std::min<std::ptrdiff_t>(o.orders - 1, static_cast<std::ptrdiff_t>(carry.size())));
      }
      if (show_progress)
        std::cerr << "\r[ngram-plan] " << total / 1000000 << " MB, " << collector.tokens_seen() / 1000000 << " M tokens"
                  << std::flush;
    }
  }
  std::cerr << (show_progress ? "\n" : "") << "[ngram-plan] read " << total / 1000000 << " MB, "
            << collector.tokens_seen() << " tokens\n";
  auto sets = collector.finish();
  if (sets.empty() || sets[0].size() == 0)
    throw input_error("ngram-plan: the corpus is empty (no bigrams in " + std::to_string(collector.tokens_seen()) + " tokens)");
  return sets;
}

std::string describe(std::int64_t rows, std::int64_t vocab) {
  char buf[64];
  const std::int64_t whole = rows / vocab;
  std::snprintf(buf, sizeof buf, "%.4fV (%lldV%+lld)", static_cast<double>(rows) / static_cast<double>(vocab),
                static_cast<long long>(whole), static_cast<long long>(rows - whole * vocab));
  return buf;
}

void plot(const plan_opts& o, const ngram_set& bigrams, std::int64_t vocab, thread_pool& pool) {
  std::vector<plot_panel> panels;
  const double centres[2] = {16.0, std::floor(o.ratio)};
  for (double c : centres) {
    std::vector<std::int64_t> sizes;
    for (int s = 0; s <= 480; ++s)
      sizes.push_back(static_cast<std::int64_t>(std::llround((c - 0.6 + 1.2 * s / 480.0) * static_cast<double>(vocab))));
    const auto evals = evaluate_sizes(bigrams, sizes, pool);
    plot_series exact{"exact hash (x_t + x_(t-1) (V mod M)) mod M", "#c0392b", {}};
    plot_series random{"random hash into M rows", "#2471a3", {}, true};
    for (const auto& e : evals) {
      const double x = static_cast<double>(e.rows) / static_cast<double>(vocab);
      exact.points.emplace_back(x, e.share);
      random.points.emplace_back(x, e.random_share);
    }
    panels.push_back({"bigram tables around " + std::to_string(static_cast<int>(c)) + "V",
                      "table size M / V", "share of distinct bigrams colliding", {exact, random}});
  }
  write_svg_plot(o.plot,
                 "n-gram hash collisions, " + std::to_string(bigrams.size()) + " distinct bigrams, V = " +
                     std::to_string(vocab),
                 panels);
  std::cerr << "[ngram-plan] plot written to " << o.plot << "\n";
}

int run_plan(const plan_opts& o_in, const CLI::App& cmd) {
  plan_opts o = o_in;
  thread_pool pool(o.threads > 0 ? o.threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency())));
  const tokenizer tok = tokenizer::load(o.tokenizer);
  model_config config;
  std::int64_t vocab = o.vocab ? o.vocab : tok.vocab_size();
  if (!o.config.empty()) {
    config = load_model_config(o.config);
    if (config.embedding != embedding_kind::ngram) throw input_error("ngram-plan: " + o.config + " has no n-gram embedding");
    if (o.vocab && o.vocab != config.vocab_size)
      throw input_error("ngram-plan: --vocab-size " + std::to_string(o.vocab) + " differs from the config's " +
                        std::to_string(config.vocab_size));
    vocab = config.vocab_size;
    if (!cmd.count("--orders")) o.orders = static_cast<int>(config.emb_neighbor_num);
    if (!cmd.count("--splits")) o.splits = static_cast<int>(config.emb_split_num);
    if (!cmd.count("--vocab-ratio")) o.ratio = config.ngram_vocab_size_ratio;
  }
  if (tok.vocab_size() > vocab)
    throw input_error("ngram-plan: the tokenizer has " + std::to_string(tok.vocab_size()) + " ids but V = " +
                      std::to_string(vocab) + "; the tokenizer does not match the model's vocabulary");

  const auto sets = collect(o, tok, vocab, pool);
  std::printf("distinct n-grams:");
  for (const auto& s : sets) std::printf("  order %d: %zu", s.order, s.size());
  std::printf("\n\n");

  for (const auto& text : o.eval) {  // explicitly requested sizes, every order
    const std::int64_t rows = parse_table_size(text, vocab);
    for (const auto& s : sets) {
      const std::int64_t one[1] = {rows};
      const auto e = evaluate_sizes(s, one, pool)[0];
      std::printf("M = %-10s %-28s order %d: collision share %.4f, random hash %.4f (x%.2f)\n", text.c_str(),
                  describe(rows, vocab).c_str(), s.order, e.share, e.random_share,
                  e.random_share > 0 ? e.share / e.random_share : 0.0);
    }
  }
  if (!o.eval.empty()) std::printf("\n");

  const auto plans = plan_tables(sets, vocab, o.ratio, o.splits, pool, o.window, o.candidates);
  std::printf("%-6s %-6s %-6s | %-30s %-9s %-9s | %-30s %-9s %-9s\n", "table", "order", "split", "released size",
              "share", "random", "recommended size", "share", "random");
  for (const auto& p : plans)
    std::printf("%-6d %-6d %-6d | %-30s %-9.4f %-9.4f | %-30s %-9.4f %-9.4f\n", p.table, p.order, p.split,
                (std::to_string(p.released_rows) + " " + describe(p.released_rows, vocab)).c_str(), p.released.share,
                p.released.random_share, (std::to_string(p.recommended.rows) + " " + describe(p.recommended.rows, vocab)).c_str(),
                p.recommended.share, p.recommended.random_share);

  if (!o.out.empty()) {
    if (o.config.empty()) throw input_error("ngram-plan: --out needs --config (the model config to write the sizes into)");
    if (config.emb_neighbor_num != o.orders || config.emb_split_num != o.splits)
      throw input_error("ngram-plan: --orders/--splits differ from the config's emb_neighbor_num/emb_split_num");
    config.ngram_table_sizes.clear();
    for (const auto& p : plans) config.ngram_table_sizes.push_back(p.recommended.rows);
    std::ofstream out(o.out, std::ios::trunc);
    out << model_config_to_json(config);
    if (!out) throw input_error(o.out + ": write failed");
    std::cerr << "[ngram-plan] wrote ngram_table_sizes into " << o.out << "\n";
  }
  if (!o.plot.empty()) plot(o, sets[0], vocab, pool);
  return 0;
}

}  // namespace

void add_ngram_plan_command(CLI::App& app, std::function<int()>& run) {
  auto o = std::make_shared<plan_opts>();
  auto* cmd = app.add_subcommand("ngram-plan",
                                 "Measure n-gram hash collisions on a corpus and recommend per-table sizes");
  cmd->add_option("--tokenizer", o->tokenizer, "tokenizer.json or tiktoken rank file")->required()->check(CLI::ExistingFile);
  cmd->add_option("--corpus", o->corpus, "text files or folders (read recursively)")->required();
  cmd->add_option("--vocab-ratio", o->ratio, "table size budget r: each table near r*V rows")->capture_default_str();
  cmd->add_option("--orders", o->orders, "largest n-gram order N (orders 2..N)")->capture_default_str();
  cmd->add_option("--splits", o->splits, "sub-tables per order K")->capture_default_str();
  cmd->add_option("--vocab-size", o->vocab, "base vocabulary V (default: the tokenizer's, or the config's)");
  cmd->add_option("--config", o->config, "model config: V, N, K, r come from it unless given")->check(CLI::ExistingFile);
  cmd->add_option("--out", o->out, "write the config with the recommended ngram_table_sizes here");
  cmd->add_option("--eval", o->eval, "also report these sizes, e.g. 78V 78V+1 16.5V 4096021");
  cmd->add_option("--plot", o->plot, "write an SVG of collision share against M/V around 16V and rV");
  cmd->add_option("--window", o->window, "recommended sizes stay within this fraction of r*V")->capture_default_str();
  cmd->add_option("--candidates", o->candidates, "sizes evaluated per order")->capture_default_str();
  cmd->add_option("--threads", o->threads, "threads; 0 = all cores")->capture_default_str();
  cmd->callback([&run, o, cmd] { run = [o, cmd] { return run_plan(*o, *cmd); }; });
}

}  // namespace troupe::cli
