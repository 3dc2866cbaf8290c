// Parsing of `troupe train` config files (training/trainer.hpp: train_config).
#include <fstream>
#include <set>
#include <sstream>

#include "model/json_fields.hpp"
#include "training/trainer.hpp"

namespace troupe::train {
namespace fs = std::filesystem;
namespace {

void only_known(const json_fields& f, const std::set<std::string>& known, const std::string& where) {
  for (auto [key, value] : f.obj) {
    (void)value;
    if (!known.count(std::string(key))) {
      std::string list;
      for (const auto& k : known) list += (list.empty() ? "" : ", ") + k;
      throw input_error(f.source + ": unknown field '" + std::string(key) + "'" + where + " (known: " + list + ")");
    }
  }
}

json_fields section(const json_fields& parent, std::string_view name, const std::string& source) {
  simdjson::dom::object o;
  if (parent.get(name).get_object().get(o)) parent.fail(name, "must be an object");
  return json_fields{o, source};
}

}  // namespace

train_config load_train_config(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw input_error(path.string() + ": cannot open the training config");
  std::stringstream text;
  text << in.rdbuf();
  simdjson::dom::parser parser;
  const simdjson::padded_string padded(text.str());
  simdjson::dom::element doc;
  if (auto err = parser.parse(padded).get(doc))
    throw input_error(path.string() + ": not valid JSON (" + simdjson::error_message(err) + ")");
  simdjson::dom::object obj;
  if (doc.get_object().get(obj)) throw input_error(path.string() + ": expected a JSON object at the top level");
  const std::string source = path.string();
  const json_fields f{obj, source};
  only_known(f, {"model", "tokenizer", "data", "batch", "pipeline", "steps", "seed", "optimizer", "out", "checkpoint_every",
                 "eval_every", "eval_sequences", "log_every", "save_dtype", "device", "gemm_math", "comment"},
             "");
  const fs::path base = path.parent_path();
  auto resolve = [&](const std::string& p) { return fs::path(p).is_absolute() ? fs::path(p) : base / p; };

  train_config c;
  c.file = path;
  const auto model = f.get("model");
  if (model.is_string()) {
    c.model = load_model_config(resolve(std::string(std::string_view(model))));
  } else if (model.is_object()) {
    c.model = parse_model_config(simdjson::minify(model), source + " (model)");
  } else {
    f.fail("model", "must be a model config file name or a model config object");
  }
  c.tokenizer = resolve(f.string_or("tokenizer", ""));
  if (c.tokenizer == base) f.fail("tokenizer", "is missing (required)");

  const auto data = section(f, "data", source + " (data)");
  only_known(data, {"paths", "seq_len", "validation_fraction"}, " in 'data'");
  simdjson::dom::array paths;
  if (data.get("paths").get_array().get(paths) || paths.size() == 0) data.fail("paths", "must be a non-empty list of file or folder names");
  for (auto p : paths) {
    std::string_view s;
    if (p.get_string().get(s)) data.fail("paths", "must hold strings");
    c.data.sources.push_back(resolve(std::string(s)));
  }
  c.data.seq_len = data.positive("seq_len");
  c.data.validation_fraction = data.number_or("validation_fraction", 0.01);
  c.data.vocab_size = c.model.vocab_size;

  if (f.has("batch")) {
    const auto b = section(f, "batch", source + " (batch)");
    only_known(b, {"sequences", "micro_batches"}, " in 'batch'");
    c.batch_sequences = b.positive("sequences");
    c.micro_batches = b.has("micro_batches") ? b.positive("micro_batches") : 1;
  }
  if (f.has("pipeline")) {
    const auto p = section(f, "pipeline", source + " (pipeline)");
    only_known(p, {"stages", "replicas"}, " in 'pipeline'");
    c.stages = p.has("stages") ? p.positive("stages") : 1;
    c.replicas = p.has("replicas") ? p.positive("replicas") : 1;
  }
  c.steps = f.positive("steps");
  c.seed = static_cast<std::uint64_t>(f.integer_or("seed", 1));
  if (f.has("optimizer")) {
    const auto o = section(f, "optimizer", source + " (optimizer)");
    only_known(o, {"learning_rate", "min_learning_rate", "warmup_steps", "beta1", "beta2", "epsilon", "weight_decay",
                   "grad_clip", "router_bias_rate"},
               " in 'optimizer'");
    auto& x = c.optimizer;
    x.learning_rate = o.number_or("learning_rate", x.learning_rate);
    x.min_learning_rate = o.number_or("min_learning_rate", x.min_learning_rate);
    x.warmup_steps = o.integer_or("warmup_steps", x.warmup_steps);
    x.beta1 = o.number_or("beta1", x.beta1);
    x.beta2 = o.number_or("beta2", x.beta2);
    x.epsilon = o.number_or("epsilon", x.epsilon);
    x.weight_decay = o.number_or("weight_decay", x.weight_decay);
    x.grad_clip = o.number_or("grad_clip", x.grad_clip);
    x.router_bias_rate = o.number_or("router_bias_rate", x.router_bias_rate);
    if (x.learning_rate <= 0 || x.min_learning_rate < 0 || x.min_learning_rate > x.learning_rate)
      o.fail("learning_rate", "must be positive and at least min_learning_rate");
    if (x.beta1 < 0 || x.beta1 >= 1 || x.beta2 < 0 || x.beta2 >= 1) o.fail("beta1", "beta1 and beta2 must be in [0, 1)");
    if (x.warmup_steps < 0) o.fail("warmup_steps", "must not be negative");
  }
  c.optimizer.total_steps = c.steps;
  const std::string out = f.string_or("out", "");
  if (out.empty()) f.fail("out", "is missing (required): the run directory for checkpoints and metrics");
  c.out = resolve(out);
  c.checkpoint_every = f.integer_or("checkpoint_every", 0);
  c.eval_every = f.integer_or("eval_every", 0);
  c.eval_sequences = f.integer_or("eval_sequences", 16);
  c.log_every = std::max<std::int64_t>(1, f.integer_or("log_every", 1));
  const std::string save = f.string_or("save_dtype", "bf16");
  if (save == "bf16") c.save_type = dtype::bf16;
  else if (save == "f32") c.save_type = dtype::f32;
  else f.fail("save_dtype", "must be \"bf16\" or \"f32\"");

  c.device = f.string_or("device", "cpu");
  c.gemm_math = f.string_or("gemm_math", "tf32");
  if (c.device != "cpu" && c.device != "cuda" && !c.device.starts_with("cuda:"))
    f.fail("device", "must be \"cpu\", \"cuda\" or \"cuda:N\"");
  if (c.gemm_math != "tf32" && c.gemm_math != "f32") f.fail("gemm_math", "must be \"tf32\" or \"f32\"");

  if (c.batch_sequences % (c.replicas * c.micro_batches) != 0)
    throw input_error(source + ": batch.sequences (" + std::to_string(c.batch_sequences) +
                      ") must be a multiple of pipeline.replicas x batch.micro_batches (" +
                      std::to_string(c.replicas * c.micro_batches) + ")");
  if (c.stages > c.model.num_layers)
    throw input_error(source + ": pipeline.stages (" + std::to_string(c.stages) + ") exceeds the model's " +
                      std::to_string(c.model.num_layers) + " blocks");
  return c;
}

}  // namespace troupe::train
