// The buffers and recording of one decode step shape (model/recorded_step.cpp says how they
// are used); shared by model.cpp, which owns them, and recorded_step.cpp, which fills them.
#pragma once

#include "model/model.hpp"

namespace troupe {

/// Keys a recorded step can attend over when the config sets no max_position_embeddings.
constexpr std::int64_t default_recorded_keys = 4096;

struct model::recorded_step {
  std::int64_t rows = 0, max_blocks = 0, max_keys = 0;
  tensor h;            // [T, H]: the step's embedded rows
  tensor positions;    // i64 [T]
  tensor row_seq;      // i32 [T]
  tensor tables;       // i64 [A * T, max_blocks]: per attention layer, each sequence's block addresses
  tensor host_tables;  // what `tables` holds (uploaded again only when a block is claimed or the batch changes)
  backend::recording recording;  // its out: logits [T, V]
};

}  // namespace troupe
