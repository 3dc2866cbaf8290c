// The actors of a training run: one stage actor per (replica, pipeline depth) and the data
// actor. The coordinator (training/trainer.cpp) wires them and drives the steps.
// Include only from .cpp files (CAF headers are heavy).
#pragma once

#include <cstdint>
#include <memory>

#include <caf/actor_system.hpp>

#include "protocol/training_interfaces.hpp"
#include "training/checkpoint_io.hpp"
#include "training/dataset.hpp"
#include "training/optimizer.hpp"
#include "training/stage_compute.hpp"

namespace troupe {
class tokenizer;
}

namespace troupe::train {

struct stage_setup {
  model_config config;
  stage_range range;
  std::int64_t stage = 0, num_stages = 1, replica = 0, num_replicas = 1;
  optimizer_config optimizer;
  std::uint64_t seed = 0;                                 // initialisation when not resuming
  std::shared_ptr<const checkpoint_contents> resume;      // values and moments to start from, or null
  std::string device = "cpu", gemm_math = "tf32";        // make_stage_compute()
  std::shared_ptr<device_group> group;                   // same-depth stages that all-reduce on their GPUs, or null
};

/// A stage actor. Forwards run when fewer than (num_stages - stage) micro-batches hold
/// activations, backwards as soon as they arrive (one forward, one backward: 1F1B), so a
/// stage never holds more activations than its depth from the end of the pipeline. An error
/// in a handler stops the actor with the error's text as its exit reason.
train_stage_actor spawn_train_stage(caf::actor_system& sys, stage_setup setup);

/// What the data actor reads and how it orders it.
struct data_setup {
  corpus_options corpus;
  std::shared_ptr<const tokenizer> tok;
  std::int32_t eos = 2;
  std::uint64_t seed = 0;
  order_position start;   // continue the order from here (resume)
  bool progress = false;  // a progress line on stderr while tokenizing
};

/// The data actor; it reads and tokenizes on its first load_atom.
train_data_actor spawn_train_data(caf::actor_system& sys, data_setup setup);

}  // namespace troupe::train
