// `troupe train` (a training run from a config file, or its resumption) and `troupe plot`
// (loss curves of one or more runs from their metrics.jsonl, as an SVG).
#include <CLI/CLI.hpp>
#include <simdjson.h>

#include <fstream>
#include <iostream>
#include <map>

#include "cli/commands.hpp"
#include "cli/svg_plot.hpp"
#include "protocol/errors.hpp"
#include "training/trainer.hpp"

namespace troupe::cli {
namespace fs = std::filesystem;
namespace {

struct train_opts {
  std::string config, device;
  bool resume = false, quiet = false;
  std::int64_t steps = 0;
};

int run_train(const train_opts& o) {
  const train::train_config config = train::load_train_config(o.config);
  train::train_options options;
  options.resume = o.resume;
  if (o.steps > 0) options.steps = o.steps;
  options.progress = !o.quiet;
  if (!o.device.empty()) options.device = o.device;
  const auto s = train::run_training(config, options);
  std::fprintf(stderr,
               "[train] steps %lld-%lld in %.1f s: %.0f tokens/s, last loss %.4f, validation loss %.4f, pipeline bubble %.1f%%\n"
               "[train] checkpoint %s (serve it with: troupe serve --model %s)\n",
               static_cast<long long>(s.first_step), static_cast<long long>(s.last_step), s.seconds, s.tokens_per_second,
               s.last_loss, s.validation_loss, 100 * s.bubble_fraction, s.checkpoint.string().c_str(),
               s.checkpoint.string().c_str());
  return 0;
}

struct plot_opts {
  std::vector<std::string> runs;
  std::string out = "loss.svg";
};

// One run's curves from its metrics.jsonl: training loss and validation loss against tokens.
std::pair<plot_series, plot_series> read_run(const fs::path& run, const std::string& color) {
  const fs::path file = fs::is_directory(run) ? run / "metrics.jsonl" : run;
  std::ifstream in(file);
  if (!in) throw input_error(file.string() + ": cannot open (expected a run directory or its metrics.jsonl)");
  const std::string name = (fs::is_directory(run) ? run : run.parent_path()).filename().string();
  plot_series train{name + " (train)", color, {}}, valid{name + " (validation)", color, {}, true};
  simdjson::dom::parser parser;
  std::string line;
  double tokens_per_step = 0;
  std::int64_t line_no = 0;
  while (std::getline(in, line)) {
    ++line_no;
    if (line.empty()) continue;
    simdjson::dom::object o;
    if (parser.parse(line).get_object().get(o))
      throw input_error(file.string() + ":" + std::to_string(line_no) + ": not a JSON object");
    std::int64_t step = 0;
    if (o["step"].get_int64().get(step)) throw input_error(file.string() + ":" + std::to_string(line_no) + ": no step");
    double v = 0;
    std::int64_t tokens = 0;
    if (!o["loss"].get_double().get(v) && !o["tokens"].get_int64().get(tokens)) {
      tokens_per_step = static_cast<double>(tokens) / static_cast<double>(step);
      train.points.emplace_back(static_cast<double>(tokens) / 1e6, v);
    } else if (!o["validation_loss"].get_double().get(v)) {
      valid.points.emplace_back(static_cast<double>(step) * tokens_per_step / 1e6, v);
    }
  }
  if (train.points.empty()) throw input_error(file.string() + ": holds no training loss lines");
  return {train, valid};
}

int run_plot(const plot_opts& o) {
  static const char* colors[] = {"#c0392b", "#2471a3", "#27ae60", "#8e44ad", "#d35400", "#16a085"};
  plot_panel panel{"loss", "tokens (millions)", "cross-entropy (nats)", {}};
  for (std::size_t i = 0; i < o.runs.size(); ++i) {
    auto [train, valid] = read_run(o.runs[i], colors[i % 6]);
    panel.series.push_back(std::move(train));
    if (!valid.points.empty()) panel.series.push_back(std::move(valid));
  }
  write_svg_plot(o.out, "Training runs", {panel});
  std::cerr << "[plot] wrote " << o.out << " (" << o.runs.size() << " run(s))\n";
  return 0;
}

}  // namespace

void add_train_commands(CLI::App& app, std::function<int()>& run) {
  auto t = std::make_shared<train_opts>();
  auto* train = app.add_subcommand(
      "train",
      "Train a model as an actor pipeline (data actor, pipeline stages, data-parallel replicas) from a JSON config;\n"
      "writes checkpoints that `troupe serve` loads, metrics.jsonl and a progress bar (see configs/train/)");
  train->add_option("--config", t->config, "training config (JSON)")->required()->check(CLI::ExistingFile);
  train->add_flag("--resume", t->resume, "continue from the run directory's latest checkpoint (the same losses: bitwise on the CPU, to 1e-4 on GPUs)");
  train->add_option("--steps", t->steps, "stop after this step instead of the config's (the schedule keeps the config's length)");
  train->add_flag("--quiet", t->quiet, "no progress bar");
  train->add_option("--device", t->device,
                    "where the stage actors compute, overriding the config's \"device\": cpu, cuda (stage actors spread\n"
                    "over the visible GPUs) or cuda:N; the GPU stages' GEMMs use the config's \"gemm_math\" (tf32 or f32)");
  train->callback([&run, t] { run = [t] { return run_train(*t); }; });

  auto p = std::make_shared<plot_opts>();
  auto* plot = app.add_subcommand("plot", "Plot the training and validation loss of one or more runs as an SVG");
  plot->add_option("runs", p->runs, "run directories (or their metrics.jsonl)")->required();
  plot->add_option("--out", p->out, "SVG file to write")->capture_default_str();
  plot->callback([&run, p] { run = [p] { return run_plot(*p); }; });
}

}  // namespace troupe::cli
