// Measuring n-gram hash collisions on a corpus and choosing table sizes (the `ngram-plan`
// command). The model's hash maps an n-gram to (sum_k x_{t-k} V^k) mod M, so a table size M
// that shares structure with V (M near a multiple or a simple fraction of V) sends many
// distinct n-grams to the same rows. This module counts the distinct n-grams of a token
// stream, evaluates the exact hash's collision share for candidate sizes, compares it with a
// random hash into the same number of slots, and recommends sizes.
//
// Collision share of a table = (distinct n-grams - occupied rows) / distinct n-grams: the
// fraction of n-grams that must share a row with an earlier one. For a random hash of n items
// into M rows its expectation is 1 - M (1 - (1 - 1/M)^n) / n.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace troupe {

class thread_pool;

__extension__ typedef unsigned __int128 ngram_key;  // sum_k x_{t-k} V^k: beyond 64 bits for n >= 4

/// The distinct n-grams of one order, each as its n base-V digits (digit k = the token k
/// places back from the n-gram's last token).
struct ngram_set {
  int order = 0;
  std::int64_t vocab = 0;
  std::vector<std::uint32_t> digits;  // [size(), order]
  std::size_t size() const { return order ? digits.size() / static_cast<std::size_t>(order) : 0; }
};

/// Streams token segments and keeps the distinct full n-grams (no padding across a segment
/// start) of orders 2..max_order, with memory bounded by the distinct count plus a buffer.
class ngram_collector {
 public:
  ngram_collector(std::int64_t vocab, int max_order);
  void add_segment(std::span<const std::int32_t> tokens);
  std::int64_t tokens_seen() const { return tokens_; }
  /// The distinct n-grams of each order 2..max_order (index 0 = bigrams).
  std::vector<ngram_set> finish();

 private:
  void compact(int order_idx);
  std::int64_t vocab_;
  int max_order_;
  std::int64_t tokens_ = 0;
  std::vector<std::vector<ngram_key>> keys_;    // per order: pending keys
  std::vector<std::size_t> sorted_prefix_;               // per order: keys_[o][0, n) sorted and unique
};

/// Rows occupied when the exact hash maps `set` into a table of `rows` rows.
std::int64_t occupied_rows(const ngram_set& set, std::int64_t rows);
/// The exact hash's collision share for a table of `rows` rows.
double collision_share(const ngram_set& set, std::int64_t rows);
/// Expected collision share of a random hash of `items` distinct items into `rows` rows.
double random_collision_share(std::int64_t items, std::int64_t rows);

struct size_evaluation {
  std::int64_t rows;
  double share, random_share;
};

/// Evaluates every candidate size (in parallel over candidates).
std::vector<size_evaluation> evaluate_sizes(const ngram_set& set, std::span<const std::int64_t> sizes, thread_pool& pool);

struct table_plan {
  int table, order, split;
  std::int64_t released_rows;    // r*V + 2i + 1
  size_evaluation released;
  size_evaluation recommended;
};

/// For each sub-table i = (n - 2) * K + j: the released size and a recommended one. The
/// recommended sizes are distinct, within `window` (relative) of r*V each, chosen among
/// `candidates_per_order` evaluated sizes: those within 2% of the random-hash share that lie
/// closest to r*V, or failing that the lowest shares.
/// Throws input_error when the budget cannot be met (too few rows, too few candidates).
std::vector<table_plan> plan_tables(std::span<const ngram_set> sets, std::int64_t vocab, double ratio, int splits,
                                    thread_pool& pool, double window = 0.01, int candidates_per_order = 256);

/// Parses a size written as "78V+3", "16.5V", "78V-2" or a plain integer.
std::int64_t parse_table_size(const std::string& text, std::int64_t vocab);

}  // namespace troupe
