// Trains a byte-level BPE tokenizer on text files and writes it as a Hugging Face
// tokenizer.json (GPT-2 split regex, ByteLevel decoder), loadable by Troupe and transformers.
// Invariant: ids 0..2 are the special tokens <|pad|>, <|bos|>, <|eos|> (the LongCat
// convention bos = 1, eos = 2), ids 3..258 the 256 bytes, then merges in the order learned;
// training is deterministic (ties broken by the pair's ids).
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

namespace troupe {

struct bpe_training_options {
  std::int64_t vocab_size = 4096;     // specials + bytes + merges
  std::int64_t min_pair_count = 2;    // stop early when no pair is this frequent
  std::int64_t max_bytes = 0;         // read at most this much text per file (0: all)
};

/// Returns the tokenizer.json text. Throws input_error for unreadable or empty corpora.
std::string train_bpe(const std::vector<std::filesystem::path>& corpus, const bpe_training_options& options);

}  // namespace troupe
