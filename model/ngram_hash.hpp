// The exact n-gram hash of LongCat-Flash-Lite (spec: model.md section 2) and the per-sequence
// N-gram cache that lets decoding hash one new token without re-reading its history.
//
//   h_i(t) = (x_t + sum_{k=1}^{n-1} s_k(t) * (V^k mod M_i)) mod M_i,  table i of order n
//
// s_k(t) is the token k places back within the current segment, 0 before its start; a segment
// ends at (and includes) each EOS. Invariant: hashing a sequence in any number of pieces, each
// continuing the same ngram_context, yields the same ids as hashing it in one piece.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

namespace troupe {

struct model_config;

/// The N-gram cache of one sequence: up to N-1 most recent tokens of its current segment,
/// oldest first. Empty at the start of a sequence and right after an EOS.
struct ngram_context {
  std::vector<std::int32_t> tail;
  friend bool operator==(const ngram_context&, const ngram_context&) = default;
};

class ngram_hasher {
 public:
  explicit ngram_hasher(const model_config& config);

  std::int64_t num_tables() const { return static_cast<std::int64_t>(modulus_.size()); }
  std::int64_t table_rows(std::int64_t i) const { return modulus_[static_cast<std::size_t>(i)]; }

  /// Hashes `tokens` as the continuation of `context`: writes ids[t * num_tables() + i] and
  /// advances `context` past the tokens.
  void hash(std::span<const std::int32_t> tokens, ngram_context& context, std::int64_t* ids) const;

 private:
  std::int64_t max_order_;                    // N
  std::int32_t eos_;
  std::vector<std::int64_t> modulus_;         // M_i
  std::vector<std::int64_t> order_;           // n of table i
  std::vector<std::vector<std::int64_t>> powers_;  // [i][k-1] = V^k mod M_i, k = 1..n-1
};

}  // namespace troupe
