#include "training/pipeline_actors.hpp"

#include <caf/event_based_actor.hpp>
#include <caf/stateful_actor.hpp>
#include <caf/typed_event_based_actor.hpp>
#include <caf/send.hpp>

#include <unistd.h>

#include <chrono>
#include <iostream>
#include <deque>
#include <map>

#include "protocol/errors.hpp"

namespace troupe::train {
namespace {

struct stage_state {
  stage_state() = default;
  stage_setup setup;
  std::unique_ptr<stage_compute> model;
  caf::actor next, previous, coordinator;
  std::vector<caf::actor> peers;  // same depth, every replica (replica order, self included)
  std::deque<train_micro_batch> forwards;
  std::deque<train_gradient> backwards;
  std::int64_t in_flight = 0;  // micro-batches with activations held
  // All-reduce in progress.
  std::int64_t reduce_step = -1;
  std::map<std::int64_t, gradient_share> shares;  // by replica (replica 0 collects)
  caf::typed_response_promise<double> reduce_promise;
  double busy_seconds = 0;
};

using stage_pointer = train_stage_actor::stateful_pointer<stage_state>;

class busy_timer {
 public:
  explicit busy_timer(double& total) : total_(total), start_(std::chrono::steady_clock::now()) {}
  ~busy_timer() { total_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count(); }

 private:
  double& total_;
  std::chrono::steady_clock::time_point start_;
};

gradient_share make_share(stage_state& st, std::int64_t step) {
  gradient_share s;
  s.step = step;
  s.replica = st.setup.replica;
  for (const auto& g : st.model->gradients()) s.grads.insert(s.grads.end(), g.values.begin(), g.values.end());
  for (const auto& t : st.model->touched()) s.touched.insert(s.touched.end(), t.begin(), t.end());
  for (const auto& block : st.model->expert_load()) s.load.insert(s.load.end(), block.begin(), block.end());
  return s;
}

// Adds (or, with overwrite, copies) a share into the stage's gradients and loads.
enum class share_mode : std::uint8_t { add, overwrite };
void apply_share(stage_state& st, const gradient_share& s, share_mode mode) {
  std::vector<named_array> grads;
  std::vector<std::vector<std::uint8_t>> touched;
  std::size_t g = 0, t = 0;
  for (const auto& spec : st.model->parameters()) {
    if (spec.role == param_role::router_bias) continue;
    std::size_t n = 1;
    for (auto d : spec.shape) n *= static_cast<std::size_t>(d);
    if (g + n > s.grads.size()) throw std::logic_error("gradient share of replica " + std::to_string(s.replica) + " is short");
    grads.push_back({spec.name, spec.shape, {s.grads.begin() + static_cast<std::ptrdiff_t>(g), s.grads.begin() + static_cast<std::ptrdiff_t>(g + n)}});
    g += n;
    if (spec.role == param_role::table) {
      const auto rows = static_cast<std::size_t>(spec.shape[0]);
      touched.emplace_back(s.touched.begin() + static_cast<std::ptrdiff_t>(t), s.touched.begin() + static_cast<std::ptrdiff_t>(t + rows));
      t += rows;
    }
  }
  st.model->add_gradients(grads, touched, mode == share_mode::overwrite);
  std::vector<std::vector<std::int64_t>> load = st.model->expert_load();
  std::size_t l = 0;
  for (auto& block : load)
    for (auto& v : block) v = mode == share_mode::add ? v + s.load.at(l++) : s.load.at(l++);
  st.model->reset_expert_load();
  st.model->add_expert_load(load);
}

void finish_reduce(stage_pointer self) {
  auto& st = self->state;
  st.reduce_step = -1;
  st.shares.clear();
  st.reduce_promise.deliver(st.model->grad_square_sum());
}

// Replica 0: once its own reduce has begun and every other replica's share is in, sums them in
// replica order (so the result does not depend on arrival order) and sends the sum back.
void sum_when_complete(stage_pointer self) {
  auto& s = self->state;
  if (s.reduce_step < 0 || static_cast<std::int64_t>(s.shares.size()) < s.setup.num_replicas - 1) return;
  for (auto& [replica, share] : s.shares) apply_share(s, share, share_mode::add);
  const gradient_share sum = make_share(s, s.reduce_step);
  for (std::int64_t r = 1; r < s.setup.num_replicas; ++r)
    self->send(caf::actor_cast<train_stage_actor>(s.peers.at(static_cast<std::size_t>(r))), share_atom::value, sum);
  finish_reduce(self);
}

void run_forward(stage_pointer self, train_micro_batch mb) {
  auto& st = self->state;
  const batch_dims dims{mb.sequences, mb.seq_len};
  const auto keep = mb.evaluate ? keep_activations::no : keep_activations::yes;
  if (!st.setup.range.head) {
    buffer<float> out;
    {
      busy_timer timer(st.busy_seconds);
      out = st.model->forward(mb.id, mb.tokens, mb.hidden, dims, keep);
    }
    if (!mb.evaluate) ++st.in_flight;
    mb.tokens.clear();
    mb.hidden = std::move(out);
    self->send(caf::actor_cast<train_stage_actor>(st.next), train_forward_atom::value, std::move(mb));
    return;
  }
  micro_batch_loss report{mb.step, mb.id, st.setup.replica, 0, 0, mb.evaluate};
  for (auto t : mb.targets) report.target_tokens += t >= 0 ? 1 : 0;
  buffer<float> grad;
  {
    busy_timer timer(st.busy_seconds);
    report.loss_sum = st.model->forward_loss(mb.id, mb.tokens, mb.hidden, mb.targets, dims, mb.loss_weight, keep, grad);
  }
  caf::anon_send(st.coordinator, loss_atom::value, report);
  if (mb.evaluate) return;
  if (st.setup.stage > 0)
    self->send(caf::actor_cast<train_stage_actor>(st.previous), train_backward_atom::value, train_gradient{mb.step, mb.id, mb.sequences, mb.seq_len, std::move(grad)});
  else
    caf::anon_send(st.coordinator, drained_atom::value, mb.step, mb.id, st.setup.replica);
}

void run_backward(stage_pointer self, train_gradient g) {
  auto& st = self->state;
  buffer<float> grad;
  {
    busy_timer timer(st.busy_seconds);
    grad = st.model->backward(g.id, g.grad, {g.sequences, g.seq_len});
  }
  --st.in_flight;
  if (st.setup.stage > 0)
    self->send(caf::actor_cast<train_stage_actor>(st.previous), train_backward_atom::value, train_gradient{g.step, g.id, g.sequences, g.seq_len, std::move(grad)});
  else
    caf::anon_send(st.coordinator, drained_atom::value, g.step, g.id, st.setup.replica);
}

// 1F1B: backwards first; a training forward only while fewer than (depth from the end)
// micro-batches hold activations here.
void pump(stage_pointer self) {
  auto& st = self->state;
  const std::int64_t limit = st.setup.num_stages - st.setup.stage;
  for (;;) {
    if (!st.backwards.empty()) {
      auto g = std::move(st.backwards.front());
      st.backwards.pop_front();
      run_backward(self, std::move(g));
    } else if (!st.forwards.empty() && (st.forwards.front().evaluate || st.setup.range.head || st.in_flight < limit)) {
      auto mb = std::move(st.forwards.front());
      st.forwards.pop_front();
      run_forward(self, std::move(mb));
    } else {
      return;
    }
  }
}

// Runs f; an exception stops the actor with its text, so the coordinator sees why.
template <class F>
void guarded(stage_pointer self, F&& f) {
  try {
    f();
  } catch (const std::exception& e) {
    self->quit(caf::make_error(caf::sec::runtime_error,
                               "stage " + std::to_string(self->state.setup.stage) + " of replica " +
                                   std::to_string(self->state.setup.replica) + ": " + e.what()));
  }
}

train_stage_actor::behavior_type stage_behavior(stage_pointer self, stage_setup setup) {
  auto& st = self->state;
  st.setup = std::move(setup);
  st.model = make_stage_compute(st.setup.config, st.setup.range, st.setup.device, st.setup.gemm_math, st.setup.group,
                                static_cast<int>(st.setup.replica));
  if (st.setup.resume) {
    st.model->set_values(st.setup.resume->values);
    st.model->load_optimizer_state(st.setup.resume->moments);
  } else {
    st.model->init(st.setup.seed);
  }
  st.setup.resume.reset();  // the values now live in the model
  return {
      [=](wire_atom, caf::actor next, caf::actor previous, caf::actor coordinator, std::vector<caf::actor> peers) {
        auto& s = self->state;
        s.next = std::move(next);
        s.previous = std::move(previous);
        s.coordinator = std::move(coordinator);
        s.peers = std::move(peers);
      },
      [=](train_forward_atom, train_micro_batch& mb) {
        self->state.forwards.push_back(std::move(mb));
        guarded(self, [&] { pump(self); });
      },
      [=](train_backward_atom, train_gradient& g) {
        self->state.backwards.push_back(std::move(g));
        guarded(self, [&] { pump(self); });
      },
      [=](reduce_atom, std::int64_t step) -> caf::result<double> {
        auto& s = self->state;
        if (s.setup.num_replicas == 1) return s.model->grad_square_sum();
        if (s.model->reduces_on_device()) {  // NCCL: every replica's stage sums here, in this call
          busy_timer timer(s.busy_seconds);
          s.model->all_reduce();
          return s.model->grad_square_sum();
        }
        s.reduce_step = step;
        s.reduce_promise = self->make_response_promise<double>();
        if (s.setup.replica > 0) {
          self->send(caf::actor_cast<train_stage_actor>(s.peers.at(0)), share_atom::value, make_share(s, step));
        } else {
          guarded(self, [&] { sum_when_complete(self); });  // the other replicas' shares may all be in
        }
        return s.reduce_promise;
      },
      [=](share_atom, gradient_share& share) {
        auto& s = self->state;
        guarded(self, [&] {
          if (s.setup.replica > 0) {  // the sum from replica 0
            apply_share(s, share, share_mode::overwrite);
            finish_reduce(self);
            return;
          }
          s.shares[share.replica] = std::move(share);
          sum_when_complete(self);
        });
      },
      [=](apply_atom, const step_update& u) -> bool {
        auto& s = self->state;
        busy_timer timer(s.busy_seconds);
        s.model->step(s.setup.optimizer, u.step, u.learning_rate, u.grad_scale);
        if (s.setup.optimizer.router_bias_rate > 0) s.model->update_router_biases(s.setup.optimizer.router_bias_rate);
        s.model->zero_grad();
        s.model->reset_expert_load();
        return true;
      },
      [=](snapshot_atom) -> stage_snapshot {
        auto& s = self->state;
        return {s.model->values(), s.model->optimizer_state()};
      },
      [=](busy_atom) -> double { return self->state.busy_seconds; },
  };
}

struct data_state {
  data_state() = default;
  data_setup setup;
  std::shared_ptr<const token_corpus> corpus;
  std::unique_ptr<sequence_order> order;

  const token_corpus& loaded() const {
    if (!corpus) throw std::logic_error("the data actor was asked for data before load_atom");
    return *corpus;
  }
};

using data_pointer = train_data_actor::stateful_pointer<data_state>;

// Runs f and converts an exception into an error reply naming its cause.
template <class T, class F>
caf::result<T> replying(F&& f) {
  try {
    return f();
  } catch (const std::exception& e) {
    return caf::make_error(caf::sec::runtime_error, std::string(e.what()));
  }
}

train_data_actor::behavior_type data_behavior(data_pointer self, data_setup setup) {
  self->state.setup = std::move(setup);
  return {
      [=](load_atom) -> caf::result<corpus_info> {
        return replying<corpus_info>([&] {
          auto& s = self->state;
          if (!s.corpus) {
            const bool tty = s.setup.progress && isatty(2);
            s.corpus = std::make_shared<const token_corpus>(token_corpus::build(
                s.setup.corpus, *s.setup.tok, s.setup.eos, [tty](std::uint64_t done, std::uint64_t total) {
                  if (tty) std::cerr << "\r[train] tokenized " << done / 1000000 << " of " << total / 1000000 << " MB" << std::flush;
                }));
            if (tty) std::cerr << "\n";
            s.order = std::make_unique<sequence_order>(s.corpus->num_train_sequences(), s.setup.seed, s.setup.start);
          }
          return corpus_info{s.corpus->num_tokens(), s.corpus->num_train_sequences(), s.corpus->num_validation_sequences(),
                             s.corpus->fingerprint()};
        });
      },
      [=](batch_atom, std::int64_t n) -> caf::result<std::vector<std::int32_t>> {
        return replying<std::vector<std::int32_t>>([&] {
          auto& s = self->state;
          const auto& corpus = s.loaded();
          std::vector<std::int32_t> out;
          out.reserve(static_cast<std::size_t>(n * (corpus.seq_len() + 1)));
          for (std::int64_t i = 0; i < n; ++i) {
            const auto seq = corpus.train_sequence(s.order->next());
            out.insert(out.end(), seq.begin(), seq.end());
          }
          return out;
        });
      },
      [=](validation_atom, std::int64_t first, std::int64_t n) -> caf::result<std::vector<std::int32_t>> {
        return replying<std::vector<std::int32_t>>([&] {
          const auto& corpus = self->state.loaded();
          std::vector<std::int32_t> out;
          for (std::int64_t i = first; i < first + n && i < corpus.num_validation_sequences(); ++i) {
            const auto seq = corpus.validation_sequence(i);
            out.insert(out.end(), seq.begin(), seq.end());
          }
          return out;
        });
      },
      [=](position_atom) -> caf::result<std::int64_t, std::int64_t> {
        if (!self->state.order) return caf::make_error(caf::sec::runtime_error, "the data is not loaded");
        const auto p = self->state.order->position();
        return {p.epoch, p.index};
      },
  };
}

}  // namespace

train_stage_actor spawn_train_stage(caf::actor_system& sys, stage_setup setup) {
  // A GPU stage blocks its thread in device synchronisations and NCCL collectives (which wait
  // for the other replicas' stages): each gets a thread of its own.
  if (setup.device != "cpu") return sys.spawn<caf::detached>(stage_behavior, std::move(setup));
  return sys.spawn(stage_behavior, std::move(setup));
}

train_data_actor spawn_train_data(caf::actor_system& sys, data_setup setup) {
  return sys.spawn(data_behavior, std::move(setup));
}

}  // namespace troupe::train
