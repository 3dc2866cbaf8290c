// The typed interfaces of the training pipeline's actors (training/pipeline.cpp). Include
// only from .cpp files (CAF headers are heavy).
#pragma once

#include <caf/atom.hpp>
#include <caf/replies_to.hpp>
#include <caf/typed_actor.hpp>

#include <vector>

#include "protocol/training_messages.hpp"
#include "protocol/training_serialization.hpp"  // every sender of these messages must see inspect()

namespace troupe {

using train_forward_atom = caf::atom_constant<caf::atom("tforward")>;
using train_backward_atom = caf::atom_constant<caf::atom("tbackward")>;
using reduce_atom = caf::atom_constant<caf::atom("reduce")>;
using share_atom = caf::atom_constant<caf::atom("share")>;
using apply_atom = caf::atom_constant<caf::atom("apply")>;
using snapshot_atom = caf::atom_constant<caf::atom("snapshot")>;
using wire_atom = caf::atom_constant<caf::atom("wire")>;
using batch_atom = caf::atom_constant<caf::atom("batch")>;
using validation_atom = caf::atom_constant<caf::atom("valid")>;
using position_atom = caf::atom_constant<caf::atom("position")>;
using loss_atom = caf::atom_constant<caf::atom("loss")>;
using drained_atom = caf::atom_constant<caf::atom("drained")>;
using busy_atom = caf::atom_constant<caf::atom("busy")>;
using load_atom = caf::atom_constant<caf::atom("load")>;

/// A stage of one replica: owns a range of blocks, their optimizer state, and the
/// activations of micro-batches between their forward and backward (1F1B order).
using train_stage_actor = caf::typed_actor<
    caf::reacts_to<wire_atom, caf::actor, caf::actor, caf::actor, std::vector<caf::actor>>,  // next, previous, coordinator, same-depth stages of the other replicas (replica order)
    caf::reacts_to<train_forward_atom, train_micro_batch>,     // queue a forward
    caf::reacts_to<train_backward_atom, train_gradient>,       // queue a backward
    caf::replies_to<reduce_atom, std::int64_t>::with<double>,  // all-reduce this step's gradients with the other replicas -> local sum of squares
    caf::reacts_to<share_atom, gradient_share>,                // a replica's share (to replica 0) or the sum (from replica 0)
    caf::replies_to<apply_atom, step_update>::with<bool>,      // optimizer step, router balancing, zero gradients
    caf::replies_to<snapshot_atom>::with<stage_snapshot>,      // values and moments for a checkpoint
    caf::replies_to<busy_atom>::with<double>>;                 // seconds spent computing so far

/// The data: reads and tokenizes the corpus, then serves packed training sequences in
/// shuffled order and the validation split.
using train_data_actor = caf::typed_actor<
    caf::replies_to<load_atom>::with<corpus_info>,                                              // read + tokenize (once), or an error naming the bad input
    caf::replies_to<batch_atom, std::int64_t>::with<std::vector<std::int32_t>>,                 // n sequences of seq_len + 1 tokens, in order
    caf::replies_to<validation_atom, std::int64_t, std::int64_t>::with<std::vector<std::int32_t>>,  // validation sequences [first, first + n)
    caf::replies_to<position_atom>::with<std::int64_t, std::int64_t>>;                          // epoch, index of the order

}  // namespace troupe
