#include "training/dataset.hpp"

#include <algorithm>
#include <fstream>
#include <sstream>

#include "model/npy.hpp"
#include "model/sampler.hpp"
#include "protocol/errors.hpp"
#include "tokenizer/tokenizer.hpp"

namespace troupe::train {
namespace fs = std::filesystem;

namespace {

std::vector<fs::path> expand(const std::vector<fs::path>& sources) {
  if (sources.empty()) throw input_error("the training data names no files or folders");
  std::vector<fs::path> files;
  for (const auto& s : sources) {
    std::error_code ec;
    if (fs::is_directory(s, ec)) {
      std::vector<fs::path> found;
      for (const auto& e : fs::recursive_directory_iterator(s))
        if (e.is_regular_file()) found.push_back(e.path());
      std::sort(found.begin(), found.end());
      if (found.empty()) throw input_error("training data folder " + s.string() + " holds no files");
      files.insert(files.end(), found.begin(), found.end());
    } else if (fs::is_regular_file(s, ec)) {
      files.push_back(s);
    } else {
      throw input_error("training data " + s.string() + " does not exist");
    }
  }
  return files;
}

// A pre-tokenized document: a 1-D int32/int64 .npy of ids in [0, vocab_size).
std::vector<std::int32_t> pretokenized(const fs::path& file, std::int64_t vocab_size) {
  const tensor t = read_npy(file);
  if (t.rank() != 1 || (t.type() != dtype::i32 && t.type() != dtype::i64))
    throw input_error("training data " + file.string() + ": a .npy source must be a 1-D int32 or int64 array of token ids, not " +
                      std::string(dtype_name(t.type())) + " " + shape_to_string(t.shape()));
  std::vector<std::int32_t> ids(static_cast<std::size_t>(t.numel()));
  for (std::int64_t i = 0; i < t.numel(); ++i) {
    const std::int64_t id = t.type() == dtype::i32 ? t.data<std::int32_t>()[i] : t.data<std::int64_t>()[i];
    if (id < 0 || (vocab_size > 0 && id >= vocab_size))
      throw input_error("training data " + file.string() + ": token id " + std::to_string(id) + " at " + std::to_string(i) +
                        " is outside the model's vocabulary of " + std::to_string(vocab_size));
    ids[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(id);
  }
  return ids;
}

}  // namespace

token_corpus token_corpus::build(const corpus_options& o, const tokenizer& tok, std::int32_t eos,
                                 const std::function<void(std::uint64_t, std::uint64_t)>& progress) {
  if (o.seq_len < 2) throw input_error("seq_len must be at least 2, got " + std::to_string(o.seq_len));
  if (!(o.validation_fraction > 0 && o.validation_fraction < 0.5))
    throw input_error("validation_fraction must be in (0, 0.5), got " + std::to_string(o.validation_fraction));
  const auto files = expand(o.sources);
  std::uint64_t total = 0, done = 0;
  for (const auto& f : files) total += fs::file_size(f);
  token_corpus c;
  c.seq_len_ = o.seq_len;
  for (const auto& f : files) {
    if (f.extension() == ".npy") {
      const auto ids = pretokenized(f, o.vocab_size);
      if (ids.empty()) continue;
      c.tokens_.insert(c.tokens_.end(), ids.begin(), ids.end());
      c.tokens_.push_back(eos);
      done += fs::file_size(f);
      if (progress) progress(done, total);
      continue;
    }
    std::ifstream in(f, std::ios::binary);
    if (!in) throw input_error("cannot read training data " + f.string());
    std::stringstream text;
    text << in.rdbuf();
    const std::string s = text.str();
    if (s.empty()) continue;
    const auto ids = tok.encode(s, special_tokens::as_text);
    c.tokens_.insert(c.tokens_.end(), ids.begin(), ids.end());
    c.tokens_.push_back(eos);
    done += s.size();
    if (progress) progress(done, total);
  }
  if (c.tokens_.empty()) throw input_error("the training data (" + std::to_string(files.size()) + " file(s)) is empty");
  const auto n = static_cast<std::int64_t>(c.tokens_.size());
  // Windows of seq_len + 1 tokens with stride seq_len; the last validation_fraction of the
  // stream (at least one window) is validation.
  const std::int64_t windows = (n - 1) / o.seq_len;
  c.num_validation_ = std::max<std::int64_t>(1, static_cast<std::int64_t>(static_cast<double>(windows) * o.validation_fraction));
  c.num_train_ = windows - c.num_validation_;
  if (c.num_train_ < 1)
    throw input_error("the training data has " + std::to_string(n) + " tokens: too few for one training and one validation " +
                      "sequence of " + std::to_string(o.seq_len) + " tokens");
  c.validation_begin_ = c.num_train_ * o.seq_len;
  std::uint64_t h = 0xcbf29ce484222325ull ^ static_cast<std::uint64_t>(o.seq_len) ^ (static_cast<std::uint64_t>(c.num_train_) << 32);
  for (auto t : c.tokens_) h = (h ^ static_cast<std::uint32_t>(t)) * 0x100000001b3ull;
  c.fingerprint_ = h;
  return c;
}

std::span<const std::int32_t> token_corpus::train_sequence(std::int64_t i) const {
  if (i < 0 || i >= num_train_) throw std::out_of_range("train sequence " + std::to_string(i));
  return {tokens_.data() + i * seq_len_, static_cast<std::size_t>(seq_len_ + 1)};
}

std::span<const std::int32_t> token_corpus::validation_sequence(std::int64_t i) const {
  if (i < 0 || i >= num_validation_) throw std::out_of_range("validation sequence " + std::to_string(i));
  return {tokens_.data() + validation_begin_ + i * seq_len_, static_cast<std::size_t>(seq_len_ + 1)};
}

sequence_order::sequence_order(std::int64_t n, std::uint64_t seed, order_position start)
    : n_(n), seed_(seed), position_(start) {
  if (n < 1) throw std::logic_error("sequence_order over nothing");
  shuffle();
}

void sequence_order::shuffle() {
  permutation_.resize(static_cast<std::size_t>(n_));
  for (std::int64_t i = 0; i < n_; ++i) permutation_[static_cast<std::size_t>(i)] = i;
  rng gen(seed_ * 0x9e3779b97f4a7c15ull + static_cast<std::uint64_t>(position_.epoch));
  for (std::int64_t i = n_ - 1; i > 0; --i)  // Fisher-Yates
    std::swap(permutation_[static_cast<std::size_t>(i)], permutation_[gen.next() % static_cast<std::uint64_t>(i + 1)]);
}

std::int64_t sequence_order::next() {
  if (position_.index >= n_) {
    ++position_.epoch;
    position_.index = 0;
    shuffle();
  }
  return permutation_[static_cast<std::size_t>(position_.index++)];
}

}  // namespace troupe::train
