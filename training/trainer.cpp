#include "training/trainer.hpp"

#include <unistd.h>

#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/scoped_actor.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <map>

#include "model/weights.hpp"
#include "protocol/error_text.hpp"
#include "protocol/errors.hpp"
#include "protocol/type_registry.hpp"
#include "tokenizer/tokenizer.hpp"
#include "training/pipeline_actors.hpp"

namespace troupe::train {
namespace fs = std::filesystem;
namespace {

using clock_type = std::chrono::steady_clock;
constexpr auto reply_timeout = std::chrono::minutes(30);  // one step of a large model on a slow machine

double seconds_since(clock_type::time_point t) { return std::chrono::duration<double>(clock_type::now() - t).count(); }

std::string duration_text(double s) {
  char buf[32];
  const auto total = static_cast<long long>(s);
  if (total >= 3600) std::snprintf(buf, sizeof buf, "%lldh%02lldm", total / 3600, total / 60 % 60);
  else std::snprintf(buf, sizeof buf, "%lldm%02llds", total / 60, total % 60);
  return buf;
}

// The coordinator's view of the actors of a run.
struct pipeline {
  caf::scoped_actor& self;
  train_data_actor data;
  std::vector<std::vector<train_stage_actor>> stages;  // [replica][stage]
  const train_config& config;

  // Stops every actor however the run ends (the actor system waits for them on exit).
  ~pipeline() {
    for (auto& replica : stages)
      for (auto& st : replica) self->send_exit(st, caf::exit_reason::user_shutdown);
    if (data) self->send_exit(data, caf::exit_reason::user_shutdown);
  }

  [[noreturn]] void fail(const caf::error& e, const std::string& what) {
    throw input_error("training: " + what + " failed: " + self->system().render(e));
  }

  std::vector<std::int32_t> request_tokens(std::int64_t n) {
    std::vector<std::int32_t> out;
    self->request(data, reply_timeout, batch_atom::value, n)
        .receive([&](std::vector<std::int32_t>& t) { out = std::move(t); }, [&](caf::error& e) { fail(e, "reading data"); });
    return out;
  }

  // Splits sequences of seq_len + 1 tokens into micro-batches (inputs, shifted targets).
  static train_micro_batch micro_batch(std::int64_t step, std::int64_t id, std::span<const std::int32_t> windows,
                                       std::int64_t sequences, std::int64_t seq_len, float weight, bool evaluate) {
    train_micro_batch mb;
    mb.step = step;
    mb.id = id;
    mb.sequences = sequences;
    mb.seq_len = seq_len;
    mb.loss_weight = weight;
    mb.evaluate = evaluate;
    for (std::int64_t s = 0; s < sequences; ++s) {
      const auto w = windows.subspan(static_cast<std::size_t>(s * (seq_len + 1)), static_cast<std::size_t>(seq_len + 1));
      mb.tokens.insert(mb.tokens.end(), w.begin(), w.end() - 1);
      mb.targets.insert(mb.targets.end(), w.begin() + 1, w.end());
    }
    return mb;
  }

  // Waits for `losses` loss reports and `drained` finished backwards; returns the losses in
  // (replica, micro-batch) order, so their sum does not depend on arrival order.
  std::map<std::pair<std::int64_t, std::int64_t>, micro_batch_loss> collect(std::int64_t losses, std::int64_t drained) {
    std::map<std::pair<std::int64_t, std::int64_t>, micro_batch_loss> got;
    std::int64_t done = 0;
    while (static_cast<std::int64_t>(got.size()) < losses || done < drained) {
      bool timed_out = false;
      self->receive(
          [&](loss_atom, micro_batch_loss& l) { got[{l.replica, l.id}] = l; },
          [&](drained_atom, std::int64_t, std::int64_t, std::int64_t) { ++done; },
          [&](caf::down_msg& d) {
            throw input_error("training: a pipeline actor stopped: " + self->system().render(d.reason));
          },
          caf::after(reply_timeout) >> [&] { timed_out = true; });
      if (timed_out) throw input_error("training: no progress from the pipeline for 30 minutes");
    }
    return got;
  }

  template <class... Ts>
  void request_all(std::vector<train_stage_actor> targets, Ts... args) {
    for (auto& a : targets) {
      self->request(a, reply_timeout, args...).receive([](bool) {}, [&](caf::error& e) { fail(e, "a stage update"); });
    }
  }

  double step(std::int64_t step_no, double& grad_norm) {
    const auto r = config.replicas, m = config.micro_batches, len = config.data.seq_len;
    const auto per_micro = config.batch_sequences / (r * m);
    const auto windows = request_tokens(config.batch_sequences);
    const float weight = 1.0f / static_cast<float>(config.batch_sequences * len);
    std::int64_t offset = 0;
    for (std::int64_t rep = 0; rep < r; ++rep)
      for (std::int64_t id = 0; id < m; ++id, offset += per_micro)
        self->send(stages[static_cast<std::size_t>(rep)][0], train_forward_atom::value,
                   micro_batch(step_no, id, std::span(windows).subspan(static_cast<std::size_t>(offset * (len + 1))), per_micro,
                               len, weight, false));
    double loss = 0;
    for (const auto& [key, l] : collect(r * m, r * m)) loss += l.loss_sum;
    // All-reduce (every stage at once: replica 0 waits for the others' shares), then the
    // global norm from replica 0's stages in stage order (equal on every replica now).
    std::map<caf::actor_addr, std::int64_t> index;
    for (std::int64_t rep = 0; rep < r; ++rep)
      for (std::int64_t s = 0; s < config.stages; ++s) {
        auto& st = stages[static_cast<std::size_t>(rep)][static_cast<std::size_t>(s)];
        index[st.address()] = rep * config.stages + s;
        self->send(st, reduce_atom::value, step_no);
      }
    std::vector<double> squares(static_cast<std::size_t>(r * config.stages), 0.0);
    for (std::size_t got = 0; got < squares.size(); ++got) {
      bool timed_out = false;
      self->receive(
          [&](double v) { squares[static_cast<std::size_t>(index.at(caf::actor_cast<caf::actor_addr>(self->current_sender())))] = v; },
          [&](caf::error& e) { fail(e, "the gradient all-reduce"); },
          [&](caf::down_msg& d) { throw input_error("training: a pipeline actor stopped: " + self->system().render(d.reason)); },
          caf::after(reply_timeout) >> [&] { timed_out = true; });
      if (timed_out) throw input_error("training: the gradient all-reduce made no progress for 30 minutes");
    }
    double square_sum = 0;
    for (std::int64_t s = 0; s < config.stages; ++s) square_sum += squares[static_cast<std::size_t>(s)];
    grad_norm = std::sqrt(square_sum);
    const step_update u{step_no, learning_rate_at(config.optimizer, step_no), clip_factor(config.optimizer, grad_norm)};
    for (auto& replica : stages) request_all(replica, apply_atom::value, u);
    return loss;
  }

  double validation_loss() {
    const auto len = config.data.seq_len;
    const auto n = config.eval_sequences;
    std::vector<std::int32_t> windows;
    self->request(data, reply_timeout, validation_atom::value, std::int64_t{0}, n)
        .receive([&](std::vector<std::int32_t>& t) { windows = std::move(t); }, [&](caf::error& e) { fail(e, "reading validation data"); });
    const auto have = static_cast<std::int64_t>(windows.size()) / (len + 1);
    if (have == 0) return NAN;
    const float weight = 1.0f / static_cast<float>(have * len);
    const std::int64_t per = std::max<std::int64_t>(1, config.batch_sequences / (config.replicas * config.micro_batches));
    std::int64_t count = 0;
    for (std::int64_t first = 0; first < have; first += per, ++count)
      self->send(stages[0][0], train_forward_atom::value,
                 micro_batch(-1, count, std::span(windows).subspan(static_cast<std::size_t>(first * (len + 1))),
                             std::min(per, have - first), len, weight, true));
    double loss = 0;
    for (const auto& [key, l] : collect(count, 0)) loss += l.loss_sum;
    return loss;
  }

  stage_snapshot snapshot() {
    stage_snapshot all;
    for (auto& st : stages[0])
      self->request(st, reply_timeout, snapshot_atom::value)
          .receive(
              [&](stage_snapshot& s) {
                for (auto& v : s.values) all.values.push_back(std::move(v));
                for (auto& m : s.moments) all.moments.push_back(std::move(m));
              },
              [&](caf::error& e) { fail(e, "taking a checkpoint"); });
    return all;
  }

  order_position position() {
    order_position p;
    self->request(data, reply_timeout, position_atom::value)
        .receive([&](std::int64_t epoch, std::int64_t index) { p = {epoch, index}; },
                 [&](caf::error& e) { fail(e, "reading the data position"); });
    return p;
  }

  double busy_mean() {
    double sum = 0;
    for (auto& st : stages[0])
      self->request(st, reply_timeout, busy_atom::value).receive([&](double v) { sum += v; }, [&](caf::error& e) { fail(e, "timing"); });
    return sum / static_cast<double>(stages[0].size());
  }
};

void check_resumable(const checkpoint_contents& c, const train_config& config, std::uint64_t fingerprint) {
  if (model_config_to_json(c.config) != model_config_to_json(config.model))
    throw input_error("cannot resume: the checkpoint's model config differs from " + config.file.string());
  if (c.state.data_fingerprint != fingerprint)
    throw input_error("cannot resume: the training data (or its seq_len) differs from the checkpoint's");
  std::map<std::string, const named_array*> values;
  for (const auto& v : c.values) values[v.name] = &v;
  for (const auto& spec : weight_specs(config.model)) {
    auto it = values.find(spec.name);
    if (it == values.end()) throw input_error("cannot resume: the checkpoint has no tensor " + spec.name);
    if (it->second->shape != spec.shape)
      throw input_error("cannot resume: tensor " + spec.name + " has shape " + shape_to_string(it->second->shape) +
                        " in the checkpoint, the model needs " + shape_to_string(spec.shape));
  }
}

class progress_bar {
 public:
  progress_bar(bool enabled, std::int64_t first, std::int64_t last) : tty_(enabled && isatty(2)), first_(first), last_(last) {}
  void update(std::int64_t step, double loss, double tokens_per_s, double elapsed, bool log_step) {
    if (!tty_ && !log_step) return;
    const double done = static_cast<double>(step - first_ + 1) / static_cast<double>(last_ - first_ + 1);
    const int width = 24, filled = static_cast<int>(done * width);
    char line[256];
    std::snprintf(line, sizeof line, "[train] step %lld/%lld [%s%s] loss %.4f | %.0f tok/s | ETA %s",
                  static_cast<long long>(step), static_cast<long long>(last_), std::string(static_cast<std::size_t>(filled), '=').c_str(),
                  std::string(static_cast<std::size_t>(width - filled), ' ').c_str(), loss, tokens_per_s,
                  duration_text(done > 0 ? elapsed * (1 - done) / done : 0).c_str());
    std::cerr << (tty_ ? "\r" : "") << line << (tty_ ? "" : "\n") << std::flush;
  }
  void message(const std::string& m) { std::cerr << (tty_ ? "\r\33[K" : "") << m << "\n"; }
  void finish() {
    if (tty_) std::cerr << "\n";
  }

 private:
  bool tty_;
  std::int64_t first_, last_;
};

}  // namespace

train_summary run_training(const train_config& config, const train_options& options) {
  // Where each stage actor computes, checked before the corpus is read.
  const std::string device = options.device.value_or(config.device);
  std::vector<std::string> placement;
  for (std::int64_t i = 0; i < config.replicas * config.stages; ++i) placement.push_back(place_stage(device, i));
  auto tok = std::make_shared<const tokenizer>(tokenizer::load(config.tokenizer));
  if (tok->vocab_size() > config.model.vocab_size)
    throw input_error("the tokenizer " + config.tokenizer.string() + " has " + std::to_string(tok->vocab_size()) +
                      " ids but the model's vocab_size is " + std::to_string(config.model.vocab_size));
  std::shared_ptr<const checkpoint_contents> resume;
  if (options.resume) {
    const auto latest = latest_checkpoint(config.out);
    if (!latest) throw input_error("--resume: " + config.out.string() + " has no checkpoint (no 'latest' file)");
    resume = std::make_shared<const checkpoint_contents>(load_checkpoint(*latest));
  }
  trainer_state state;
  state.seed = config.seed;
  if (resume) state = resume->state;

  caf::actor_system_config cfg;
  add_message_types(cfg);
  cfg.set("logger.verbosity", caf::atom("quiet"));
  caf::actor_system sys{cfg};
  caf::scoped_actor self{sys};
  // The data actor reads and tokenizes the corpus; its answer says how much there is.
  std::cerr << "[train] tokenizing " << config.data.sources.size() << " source(s) with " << config.tokenizer.filename().string() << "\n";
  data_setup data{config.data, tok, config.model.eos_token_id, config.seed,
                  {state.epoch, state.position}, options.progress};
  pipeline p{self, spawn_train_data(sys, std::move(data)), {}, config};
  corpus_info info;
  self->request(p.data, reply_timeout, load_atom::value)
      .receive([&](corpus_info& i) { info = i; },
               [&](caf::error& e) { throw input_error(error_text(sys, e)); });
  std::cerr << "[train] " << info.tokens << " tokens: " << info.train_sequences << " training and "
            << info.validation_sequences << " validation sequences of " << config.data.seq_len << "\n";
  if (resume) {
    check_resumable(*resume, config, info.fingerprint);
    std::cerr << "[train] resuming after step " << state.step << " from " << config.out.string() << "\n";
  } else {
    state.data_fingerprint = info.fingerprint;
  }
  const std::int64_t last_step = options.steps.value_or(config.steps);
  if (state.step >= last_step) throw input_error("nothing to do: the run is already at step " + std::to_string(state.step));
  fs::create_directories(config.out);

  if (device != "cpu") std::cerr << "[train] stage actors on " << device << " (GEMMs in " << config.gemm_math << ")\n";
  std::vector<std::shared_ptr<device_group>> groups;  // per pipeline depth
  for (std::int64_t s = 0; s < config.stages; ++s) {
    std::vector<std::string> devices;
    for (std::int64_t r = 0; r < config.replicas; ++r) devices.push_back(placement[static_cast<std::size_t>(r * config.stages + s)]);
    groups.push_back(make_device_group(devices));
  }
  if (config.replicas > 1 && groups.front())
    std::cerr << "[train] replicas all-reduce their gradients on the GPUs (NCCL)\n";
  for (std::int64_t r = 0; r < config.replicas; ++r) {
    p.stages.emplace_back();
    for (std::int64_t s = 0; s < config.stages; ++s) {
      stage_setup setup{config.model, stage_range::split(config.model.num_layers, config.stages, s), s, config.stages, r,
                        config.replicas, config.optimizer, config.seed, resume,
                        placement[static_cast<std::size_t>(r * config.stages + s)], config.gemm_math,
                        groups[static_cast<std::size_t>(s)]};
      p.stages.back().push_back(spawn_train_stage(sys, std::move(setup)));
      self->monitor(p.stages.back().back());
    }
  }
  resume.reset();
  for (std::int64_t r = 0; r < config.replicas; ++r)
    for (std::int64_t s = 0; s < config.stages; ++s) {
      auto& row = p.stages[static_cast<std::size_t>(r)];
      std::vector<caf::actor> peers;
      for (std::int64_t q = 0; q < config.replicas; ++q)
        peers.push_back(caf::actor_cast<caf::actor>(p.stages[static_cast<std::size_t>(q)][static_cast<std::size_t>(s)]));
      self->send(row[static_cast<std::size_t>(s)], wire_atom::value,
                 s + 1 < config.stages ? caf::actor_cast<caf::actor>(row[static_cast<std::size_t>(s + 1)]) : caf::actor{},
                 s > 0 ? caf::actor_cast<caf::actor>(row[static_cast<std::size_t>(s - 1)]) : caf::actor{},
                 caf::actor_cast<caf::actor>(self), std::move(peers));
    }

  std::ofstream metrics(config.out / "metrics.jsonl", std::ios::app);
  if (!metrics) throw input_error((config.out / "metrics.jsonl").string() + ": cannot write");
  train_summary summary;
  summary.first_step = state.step + 1;
  progress_bar bar(options.progress, summary.first_step, last_step);
  const auto start = clock_type::now();
  double step_seconds = 0;  // inside optimizer steps (not evaluation or checkpoints): the bubble's base
  const std::int64_t tokens_per_step = config.batch_sequences * config.data.seq_len;
  auto save = [&] {
    const stage_snapshot snap = p.snapshot();
    const auto pos = p.position();
    state.epoch = pos.epoch;
    state.position = pos.index;
    checkpoint_contents c{config.model, snap.values, snap.moments, state};
    summary.checkpoint = save_checkpoint(config.out, c, config.save_type, config.tokenizer);
    bar.message("[train] saved " + summary.checkpoint.string());
  };
  for (std::int64_t step = state.step + 1; step <= last_step; ++step) {
    double grad_norm = 0;
    const auto step_start = clock_type::now();
    const double loss = p.step(step, grad_norm);
    step_seconds += seconds_since(step_start);
    if (!std::isfinite(loss)) throw input_error("training diverged: the loss at step " + std::to_string(step) + " is " + std::to_string(loss));
    state.step = step;
    state.tokens_seen += tokens_per_step;
    summary.last_loss = loss;
    const double elapsed = seconds_since(start);
    const double tps = static_cast<double>((step - summary.first_step + 1) * tokens_per_step) / elapsed;
    const bool log_step = step % config.log_every == 0 || step == last_step;
    if (log_step) {
      char line[512];
      std::snprintf(line, sizeof line,
                    "{\"step\":%lld,\"loss\":%.17g,\"learning_rate\":%.9g,\"grad_norm\":%.9g,\"tokens\":%lld,"
                    "\"tokens_per_s\":%.1f,\"elapsed_s\":%.3f}\n",
                    static_cast<long long>(step), loss, learning_rate_at(config.optimizer, step), grad_norm,
                    static_cast<long long>(state.tokens_seen), tps, elapsed);
      metrics << line << std::flush;
    }
    bar.update(step, loss, tps, elapsed, log_step);
    if ((config.eval_every > 0 && step % config.eval_every == 0) || step == last_step) {
      summary.validation_loss = p.validation_loss();
      char line[160];
      std::snprintf(line, sizeof line, "{\"step\":%lld,\"validation_loss\":%.17g}\n", static_cast<long long>(step),
                    summary.validation_loss);
      metrics << line << std::flush;
      char msg[96];
      std::snprintf(msg, sizeof msg, "[train] step %lld: validation loss %.4f", static_cast<long long>(step), summary.validation_loss);
      bar.message(msg);
    }
    if ((config.checkpoint_every > 0 && step % config.checkpoint_every == 0) || step == last_step) save();
  }
  bar.finish();
  summary.last_step = last_step;
  summary.seconds = seconds_since(start);
  summary.tokens_per_second = static_cast<double>((last_step - summary.first_step + 1) * tokens_per_step) / summary.seconds;
  summary.bubble_fraction = 1.0 - p.busy_mean() / step_seconds;
  return summary;
}

}  // namespace troupe::train
