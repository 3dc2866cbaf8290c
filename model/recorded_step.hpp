// The buffers and recordings of one decode step shape and of one chain of greedy draft steps
// (model/recorded_step.cpp says how they are used); shared by model.cpp, which owns them, and
// recorded_step.cpp, which fills them.
#pragma once

#include "model/model.hpp"

namespace troupe {

/// The most rows one sequence may add in a recorded step (decode: 1; verification: k + 1).
constexpr std::int64_t max_recorded_rows_per_sequence = 8;

/// The fewest keys a recorded step's block tables have room for (more as sequences grow).
constexpr std::int64_t min_recorded_keys = 256;

struct model::recorded_step {
  std::int64_t rows = 0, max_blocks = 0, max_keys = 0;
  // Embedding outside the recording (tables in host memory): its rows go into h.
  tensor h;            // [T, H]: the step's embedded rows
  // Embedding inside it (tables on the device): the tokens go in, the rows are gathered and
  // projected on the device; the n-gram ids are hashed there by the device N-gram cache (one
  // token per sequence) or uploaded after the host hashed them (verification's several).
  bool embeds = false;
  tensor tokens;                            // i32 [T]
  tensor token_rows;                        // i64 [T]: the same, as table rows
  tensor ngram_ids;                         // i64 [E, T]
  std::unique_ptr<device_ngram> ngram;      // slot i: the step's sequence i (null: the host hashes)
  std::vector<ngram_context> slot_context;  // the context each slot holds (a copy of the host's)
  tensor positions;    // i64 [T]
  tensor row_seq;      // i32 [T]
  tensor tables;       // i64 [A * T, max_blocks]: per attention layer, each sequence's block addresses
  tensor host_tables;  // what `tables` holds (uploaded again only when a block is claimed or the batch changes)
  backend::recording recording;  // its out: logits [T, V]
};

struct model::recorded_draft {
  std::int64_t rows = 0, sequences = 0, steps = 0, max_blocks = 0, max_keys = 0;
  // The first step: every sequence's fed tokens (n-gram ids hashed on the host), then the hidden
  // states of each sequence's last row.
  tensor tokens, token_rows, ngram_ids, positions, row_seq;  // [rows] (ngram_ids [E, rows])
  tensor last_rows;                                           // i64 [sequences]
  // Each later step: one row per sequence, its token the pick before it, hashed by the device
  // N-gram cache (slot i: sequence i) when the model has n-gram tables.
  tensor later_positions;                   // i64 [(steps - 1) * sequences]
  tensor later_row_seq;                     // i32 [sequences]: 0, 1, ...
  tensor later_ngram_ids;                   // i64 [E, sequences]
  tensor picks32;                           // i32 [steps, sequences]: the picks as the hash takes them
  std::unique_ptr<device_ngram> ngram;
  std::vector<ngram_context> slot_context;  // the context each slot holds (a copy of the host's)
  tensor tables, host_tables;               // i64 [A * sequences, max_blocks], as in recorded_step
  backend::recording recording;             // its out: the picks, i64 [steps, sequences]
};

}  // namespace troupe
