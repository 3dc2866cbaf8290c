// Training data: text files (or folders of them) tokenized into one stream of documents
// separated by EOS, cut into fixed-length sequences; the stream's tail is the validation
// split; training sequences come in a deterministic shuffled order per epoch. A `.npy` source is
// a document already tokenized (a 1-D int32 or int64 array of ids, e.g. from NumPy or a
// model's own generations for distilling a draft), taken as it is.
//
// Invariant: the same files, tokenizer, sequence length and seed give the same sequences in
// the same order on every machine, and an order_position is all it takes to continue the
// order exactly (resume).
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <span>
#include <vector>

namespace troupe {
class tokenizer;
}

namespace troupe::train {

struct corpus_options {
  std::vector<std::filesystem::path> sources;  // files, or folders read recursively (sorted)
  std::int64_t seq_len = 128;                  // tokens per sequence (each also needs its next token)
  double validation_fraction = 0.01;           // tail of the token stream kept for validation
  std::int64_t vocab_size = 0;                 // ids of .npy sources must be below it (0: unchecked)
};

class token_corpus {
 public:
  /// Reads and tokenizes every source (each file one document, followed by EOS; .npy files are
  /// ids already). Throws input_error for a missing source, an empty corpus, one too small for a
  /// train and a validation sequence, or a .npy that is not a 1-D int array of ids in the vocabulary. `progress(bytes_done, bytes_total)` is called as files finish.
  static token_corpus build(const corpus_options& options, const tokenizer& tok, std::int32_t eos,
                            const std::function<void(std::uint64_t, std::uint64_t)>& progress = {});

  std::int64_t seq_len() const { return seq_len_; }
  std::int64_t num_train_sequences() const { return num_train_; }
  std::int64_t num_validation_sequences() const { return num_validation_; }
  std::int64_t num_tokens() const { return static_cast<std::int64_t>(tokens_.size()); }
  /// seq_len + 1 tokens: inputs are the first seq_len, targets the last seq_len.
  std::span<const std::int32_t> train_sequence(std::int64_t i) const;
  std::span<const std::int32_t> validation_sequence(std::int64_t i) const;
  /// A hash of the token stream and the split (checkpoints refuse to resume on other data).
  std::uint64_t fingerprint() const { return fingerprint_; }

 private:
  std::vector<std::int32_t> tokens_;
  std::int64_t seq_len_ = 0, num_train_ = 0, num_validation_ = 0, validation_begin_ = 0;
  std::uint64_t fingerprint_ = 0;
};

/// Where a shuffled order stands: epoch and the next index within it.
struct order_position {
  std::int64_t epoch = 0, index = 0;
};

/// The training order: a fresh permutation of 0..n-1 per epoch, drawn from (seed, epoch).
class sequence_order {
 public:
  sequence_order(std::int64_t n, std::uint64_t seed, order_position start = {});
  /// The next sequence index (rolls into the next epoch at the end of one).
  std::int64_t next();
  order_position position() const { return position_; }

 private:
  void shuffle();
  std::int64_t n_;
  std::uint64_t seed_;
  order_position position_;
  std::vector<std::int64_t> permutation_;
};

}  // namespace troupe::train
