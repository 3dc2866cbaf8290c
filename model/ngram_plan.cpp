#include "model/ngram_plan.hpp"

#include <algorithm>
#include <cmath>
#include <set>

#include "gpu/cpu/thread_pool.hpp"
#include "protocol/errors.hpp"

namespace troupe {
namespace {

constexpr std::size_t compact_every = std::size_t(1) << 24;  // pending keys before a sort + unique

}  // namespace

ngram_collector::ngram_collector(std::int64_t vocab, int max_order)
    : vocab_(vocab), max_order_(max_order), keys_(static_cast<std::size_t>(std::max(0, max_order - 1))),
      sorted_prefix_(keys_.size(), 0) {
  if (vocab <= 0) throw input_error("ngram-plan: the vocabulary size must be positive");
  if (max_order < 2) throw input_error("ngram-plan: --orders must be at least 2 (n-gram orders 2..N)");
}

void ngram_collector::add_segment(std::span<const std::int32_t> tokens) {
  const auto v = static_cast<ngram_key>(vocab_);
  for (std::size_t t = 0; t < tokens.size(); ++t) {
    if (tokens[t] < 0 || tokens[t] >= vocab_)
      throw input_error("ngram-plan: token id " + std::to_string(tokens[t]) + " is outside the vocabulary of " +
                        std::to_string(vocab_) + " (does the tokenizer match the model's vocab_size?)");
    ngram_key key = static_cast<ngram_key>(tokens[t]);
    ngram_key power = 1;
    for (int n = 2; n <= max_order_ && static_cast<std::size_t>(n - 1) <= t; ++n) {
      power *= v;
      key += static_cast<ngram_key>(tokens[t - static_cast<std::size_t>(n - 1)]) * power;
      auto& keys = keys_[static_cast<std::size_t>(n - 2)];
      keys.push_back(key);
      if (keys.size() - sorted_prefix_[static_cast<std::size_t>(n - 2)] >= compact_every) compact(n - 2);
    }
  }
  tokens_ += static_cast<std::int64_t>(tokens.size());
}

void ngram_collector::compact(int order_idx) {
  auto& keys = keys_[static_cast<std::size_t>(order_idx)];
  auto& prefix = sorted_prefix_[static_cast<std::size_t>(order_idx)];
  const auto mid = keys.begin() + static_cast<std::ptrdiff_t>(prefix);
  std::sort(mid, keys.end());
  keys.erase(std::unique(mid, keys.end()), keys.end());
  std::inplace_merge(keys.begin(), keys.begin() + static_cast<std::ptrdiff_t>(prefix), keys.end());
  keys.erase(std::unique(keys.begin(), keys.end()), keys.end());
  prefix = keys.size();
}

std::vector<ngram_set> ngram_collector::finish() {
  std::vector<ngram_set> out;
  const auto v = static_cast<ngram_key>(vocab_);
  for (std::size_t o = 0; o < keys_.size(); ++o) {
    compact(static_cast<int>(o));
    ngram_set s;
    s.order = static_cast<int>(o) + 2;
    s.vocab = vocab_;
    s.digits.reserve(keys_[o].size() * static_cast<std::size_t>(s.order));
    for (ngram_key key : keys_[o])
      for (int k = 0; k < s.order; ++k, key /= v) s.digits.push_back(static_cast<std::uint32_t>(key % v));
    std::vector<ngram_key>().swap(keys_[o]);
    out.push_back(std::move(s));
  }
  return out;
}

std::int64_t occupied_rows(const ngram_set& set, std::int64_t rows) {
  if (rows <= 0) throw input_error("ngram-plan: a table needs at least one row");
  if (static_cast<double>(set.vocab) * static_cast<double>(rows) > 1.8e19)
    throw input_error("ngram-plan: table of " + std::to_string(rows) + " rows is too large for 64-bit hashing");
  const auto m = static_cast<std::uint64_t>(rows);
  std::vector<std::uint64_t> powers(static_cast<std::size_t>(set.order));  // V^k mod M
  ngram_key p = 1;
  for (int k = 0; k < set.order; ++k) {
    powers[static_cast<std::size_t>(k)] = static_cast<std::uint64_t>(p % m);
    p = (p * static_cast<ngram_key>(set.vocab)) % m;
  }
  std::vector<std::uint64_t> used((m + 63) / 64, 0);
  std::int64_t occupied = 0;
  const std::size_t n = set.size();
  const auto order = static_cast<std::size_t>(set.order);
  for (std::size_t i = 0; i < n; ++i) {
    const std::uint32_t* d = set.digits.data() + i * order;
    std::uint64_t h = d[0] % m;
    for (std::size_t k = 1; k < order; ++k) h = (h + d[k] * powers[k] % m) % m;
    std::uint64_t& word = used[h / 64];
    const std::uint64_t bit = std::uint64_t(1) << (h % 64);
    occupied += (word & bit) == 0;
    word |= bit;
  }
  return occupied;
}

double collision_share(const ngram_set& set, std::int64_t rows) {
  const auto n = static_cast<double>(set.size());
  return n > 0 ? (n - static_cast<double>(occupied_rows(set, rows))) / n : 0.0;
}

double random_collision_share(std::int64_t items, std::int64_t rows) {
  if (items <= 0) return 0.0;
  const double n = static_cast<double>(items), m = static_cast<double>(rows);
  // Expected occupied rows M (1 - (1 - 1/M)^n), computed stably through log1p/expm1.
  const double occupied = -m * std::expm1(n * std::log1p(-1.0 / m));
  return std::max(0.0, (n - occupied) / n);
}

std::vector<size_evaluation> evaluate_sizes(const ngram_set& set, std::span<const std::int64_t> sizes, thread_pool& pool) {
  std::vector<size_evaluation> out(sizes.size());
  pool.parallel_for(static_cast<std::int64_t>(sizes.size()), [&](std::int64_t b, std::int64_t e) {
    for (std::int64_t i = b; i < e; ++i) {
      const auto rows = sizes[static_cast<std::size_t>(i)];
      out[static_cast<std::size_t>(i)] = {rows, collision_share(set, rows),
                                          random_collision_share(static_cast<std::int64_t>(set.size()), rows)};
    }
  });
  return out;
}

std::vector<table_plan> plan_tables(std::span<const ngram_set> sets, std::int64_t vocab, double ratio, int splits,
                                    thread_pool& pool, double window, int candidates_per_order) {
  if (!(ratio > 0)) throw input_error("ngram-plan: --vocab-ratio must be positive");
  if (splits < 1) throw input_error("ngram-plan: --splits must be at least 1");
  const auto m = static_cast<std::int64_t>(std::floor(ratio * static_cast<double>(vocab)));
  const auto half_width = static_cast<std::int64_t>(std::floor(window * static_cast<double>(m)));
  if (m < 2 || 2 * half_width + 1 < 2 * splits)
    throw input_error("ngram-plan: a budget of r*V = " + std::to_string(m) + " rows per table leaves no room for " +
                      std::to_string(splits) + " distinct sizes per order within " + std::to_string(window * 100) +
                      "%; raise --vocab-ratio");
  std::vector<table_plan> plans;
  std::set<std::int64_t> taken;
  for (const auto& set : sets) {
    const int order = set.order;
    // Candidates: a grid over the whole window, and a denser one near r*V so that a good
    // size close to the budget is found when one exists.
    std::vector<std::int64_t> sizes;
    const int count = std::max(candidates_per_order, 2 * splits);
    for (int c = 0; c < count / 2; ++c)
      sizes.push_back(m - half_width + (2 * half_width) * c / std::max(1, count / 2 - 1));
    const std::int64_t near_step = std::max<std::int64_t>(1, half_width / (4 * count));
    for (int c = 1; c <= count / 4; ++c) {
      sizes.push_back(m + c * near_step);
      sizes.push_back(m - c * near_step);
    }
    std::vector<std::int64_t> released;
    for (int j = 0; j < splits; ++j) released.push_back(m + 2 * ((order - 2) * splits + j) + 1);
    sizes.insert(sizes.end(), released.begin(), released.end());
    std::sort(sizes.begin(), sizes.end());
    sizes.erase(std::unique(sizes.begin(), sizes.end()), sizes.end());
    auto evals = evaluate_sizes(set, sizes, pool);
    auto find = [&](std::int64_t rows) {
      return *std::find_if(evals.begin(), evals.end(), [&](const auto& e) { return e.rows == rows; });
    };
    // Good sizes (within 2% of a random hash) closest to the budget first; then the rest by share.
    auto good = [](const size_evaluation& e) { return e.share <= 1.02 * e.random_share; };
    std::vector<size_evaluation> ranked = evals;
    std::sort(ranked.begin(), ranked.end(), [&](const auto& a, const auto& b) {
      if (good(a) != good(b)) return good(a);
      if (good(a)) return std::llabs(a.rows - m) < std::llabs(b.rows - m);
      return a.share < b.share;
    });
    int j = 0;
    for (const auto& e : ranked) {
      if (j == splits) break;
      if (!taken.insert(e.rows).second) continue;
      const int table = (order - 2) * splits + j;
      plans.push_back({table, order, j, released[static_cast<std::size_t>(j)], find(released[static_cast<std::size_t>(j)]), e});
      ++j;
    }
    if (j < splits) throw input_error("ngram-plan: not enough distinct candidate sizes for order " + std::to_string(order));
  }
  return plans;
}

std::int64_t parse_table_size(const std::string& text, std::int64_t vocab) {
  const auto v_pos = text.find_first_of("Vv");
  try {
    if (v_pos == std::string::npos) {
      std::size_t used = 0;
      const long long n = std::stoll(text, &used);
      if (used != text.size() || n <= 0) throw std::invalid_argument(text);
      return n;
    }
    const double factor = v_pos ? std::stod(text.substr(0, v_pos)) : 1.0;
    std::int64_t offset = 0;
    const std::string rest = text.substr(v_pos + 1);
    if (!rest.empty()) {
      std::size_t used = 0;
      offset = std::stoll(rest, &used);
      if (used != rest.size() || (rest[0] != '+' && rest[0] != '-')) throw std::invalid_argument(text);
    }
    const auto rows = static_cast<std::int64_t>(std::floor(factor * static_cast<double>(vocab))) + offset;
    if (rows <= 0) throw std::invalid_argument(text);
    return rows;
  } catch (const std::logic_error&) {
    throw input_error("ngram-plan: table size '" + text + "' is not a positive integer or of the form 78V, 78V+3, 16.5V");
  }
}

}  // namespace troupe
