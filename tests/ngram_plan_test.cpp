// The collision planner on streams small enough to count by hand, including table sizes that
// are exact multiples of V (where every bigram ending in the same token collides).
#include <gtest/gtest.h>

#include <cmath>
#include <set>

#include "gpu/cpu/thread_pool.hpp"
#include "model/ngram_plan.hpp"
#include "protocol/errors.hpp"

namespace troupe {
namespace {

std::vector<ngram_set> collect(std::int64_t vocab, int orders, const std::vector<std::int32_t>& tokens) {
  ngram_collector c(vocab, orders);
  c.add_segment(tokens);
  return c.finish();
}

}  // namespace

TEST(ngram_plan, hand_counted_bigram_collisions) {
  // Bigrams (1,2) (2,3) (3,2) (2,5) (5,2): five distinct, V = 10.
  const auto sets = collect(10, 2, {1, 2, 3, 2, 5, 2});
  ASSERT_EQ(sets.size(), 1u);
  ASSERT_EQ(sets[0].size(), 5u);
  // M = V: h = x_t, so the three bigrams ending in 2 share one row: rows {2, 3, 5}.
  EXPECT_EQ(occupied_rows(sets[0], 10), 3);
  EXPECT_DOUBLE_EQ(collision_share(sets[0], 10), 0.4);
  // M = 2V: h = (x_t + 10 x_(t-1)) mod 20 -> 12, 3, 12, 5, 12: still three rows.
  EXPECT_EQ(occupied_rows(sets[0], 20), 3);
  // M = 7: V mod 7 = 3 -> 5, 2, 4, 4, 3: four rows, one collision.
  EXPECT_EQ(occupied_rows(sets[0], 7), 4);
  EXPECT_DOUBLE_EQ(collision_share(sets[0], 7), 0.2);
  // M = 11 separates them all: 12, 23, 32, 25, 52 mod 11 = 1, 1, 10, 3, 8 -> (1,2) and (2,3) collide.
  EXPECT_EQ(occupied_rows(sets[0], 11), 4);
  // M = 13: 12, 23, 32, 25, 52 mod 13 = 12, 10, 6, 12, 0 -> (1,2) and (2,5) collide.
  EXPECT_EQ(occupied_rows(sets[0], 13), 4);
  // M = 17: 12, 6, 15, 8, 1 -> all distinct.
  EXPECT_EQ(occupied_rows(sets[0], 17), 5);
}

TEST(ngram_plan, trigrams_use_every_digit) {
  // Trigrams of 1 2 3 1 2 4 with V = 10: 123, 231, 312, 124 (as x_(t-2) x_(t-1) x_t).
  const auto sets = collect(10, 3, {1, 2, 3, 1, 2, 4});
  ASSERT_EQ(sets.size(), 2u);
  EXPECT_EQ(sets[1].order, 3);
  ASSERT_EQ(sets[1].size(), 4u);
  // M = 100: h = (x_t + 10 x_(t-1) + 100 x_(t-2)) mod 100 drops the oldest token: 23, 31, 12, 24.
  EXPECT_EQ(occupied_rows(sets[1], 100), 4);
  // M = 10: only the last token counts: 3, 1, 2, 4.
  EXPECT_EQ(occupied_rows(sets[1], 10), 4);
  // M = 9: digit sums mod 9: 6, 6, 6, 7 -> two rows.
  EXPECT_EQ(occupied_rows(sets[1], 9), 2);
}

TEST(ngram_plan, random_expectation) {
  EXPECT_NEAR(random_collision_share(1, 5), 0.0, 1e-12);
  EXPECT_NEAR(random_collision_share(2, 2), 0.25, 1e-12);  // occupied 2 (1 - 1/4) = 1.5 of 2
  // Many items, many rows: 1 - (1 - e^-l) / l with l = n / M.
  const double l = 917000.0 / (78.0 * 50257);
  EXPECT_NEAR(random_collision_share(917000, 78 * 50257), 1 - (1 - std::exp(-l)) / l, 1e-6);
}

TEST(ngram_plan, streaming_in_pieces_collects_the_same_set) {
  std::vector<std::int32_t> tokens;
  for (int i = 0; i < 5000; ++i) tokens.push_back((i * 7919 + i / 13) % 97);
  ngram_collector whole(97, 4), pieces(97, 4);
  whole.add_segment(tokens);
  for (std::size_t b = 0; b < tokens.size(); b += 300) {
    const std::size_t begin = b >= 3 ? b - 3 : 0;  // the caller carries N-1 tokens across pieces
    pieces.add_segment(std::span<const std::int32_t>(tokens).subspan(begin, std::min(tokens.size(), b + 300) - begin));
  }
  const auto a = whole.finish(), c = pieces.finish();
  for (std::size_t o = 0; o < a.size(); ++o) EXPECT_EQ(a[o].digits, c[o].digits) << "order " << o + 2;
}

TEST(ngram_plan, recommendations_are_distinct_good_and_near_the_budget) {
  std::vector<std::int32_t> tokens;
  std::uint64_t x = 1;
  for (int i = 0; i < 200000; ++i) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    tokens.push_back(static_cast<std::int32_t>((x >> 33) % 500));
  }
  const auto sets = collect(500, 3, tokens);
  thread_pool pool(2);
  const auto plans = plan_tables(sets, 500, 40, 3, pool, 0.01, 64);
  ASSERT_EQ(plans.size(), 6u);
  std::set<std::int64_t> sizes;
  for (const auto& p : plans) {
    sizes.insert(p.recommended.rows);
    EXPECT_LE(std::llabs(p.recommended.rows - 20000), 200) << p.table;
    EXPECT_LE(p.recommended.share, 1.05 * p.recommended.random_share) << p.table;
    EXPECT_EQ(p.released_rows, 20000 + 2 * p.table + 1);
  }
  EXPECT_EQ(sizes.size(), 6u);
}

TEST(ngram_plan, bad_input_is_refused) {
  EXPECT_THROW(ngram_collector(10, 1), input_error);
  ngram_collector c(10, 2);
  EXPECT_THROW(c.add_segment(std::vector<std::int32_t>{1, 12}), input_error);  // id outside V
  thread_pool pool(1);
  const auto sets = collect(10, 2, {1, 2, 3});
  EXPECT_THROW(plan_tables(sets, 10, 0.1, 4, pool), input_error);   // r*V = 1 row: no room for 4 sizes
  EXPECT_THROW(plan_tables(sets, 10, -1.0, 1, pool), input_error);
  EXPECT_EQ(parse_table_size("78V+3", 50257), 78 * 50257 + 3);
  EXPECT_EQ(parse_table_size("16.5V", 50257), 829240);
  EXPECT_EQ(parse_table_size("78V-2", 10), 778);
  EXPECT_EQ(parse_table_size("4096021", 10), 4096021);
  EXPECT_THROW(parse_table_size("78X", 10), input_error);
  EXPECT_THROW(parse_table_size("V+x", 10), input_error);
  EXPECT_THROW(parse_table_size("-5", 10), input_error);
}

}  // namespace troupe
