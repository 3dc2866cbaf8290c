#include <gtest/gtest.h>

#include "model/config.hpp"
#include "model/ngram_hash.hpp"
#include "tests/test_support.hpp"

namespace troupe {
namespace {

__extension__ typedef unsigned __int128 u128;

// V = 10, N = 3, K = 2, r = 2: tables of order 2 have M = 21, 23; of order 3, M = 25, 27.
model_config small() {
  return test::tiny_config(R"("vocab_size": 10, "emb_neighbor_num": 3, "emb_split_num": 2, "ngram_vocab_size_ratio": 2,
                              "bos_token_id": 1, "eos_token_id": 2)");
}

}  // namespace

TEST(ngram_hash, hand_computed_ids) {
  const auto c = small();
  ngram_hasher h(c);
  ASSERT_EQ(h.num_tables(), 4);
  EXPECT_EQ(h.table_rows(0), 21);
  EXPECT_EQ(h.table_rows(3), 27);
  const std::vector<std::int32_t> tokens = {3, 5, 2, 7, 4};  // 2 is EOS
  std::vector<std::int64_t> ids(5 * 4);
  ngram_context ctx;
  h.hash(tokens, ctx, ids.data());
  // t=0: no history: x mod M.
  EXPECT_EQ(ids[0 * 4 + 0], 3);
  // t=1: bigram (3,5): (5 + 3*10) mod 21 = 14, mod 23 = 12; trigram: (5 + 30 + 0) mod 25 = 10, mod 27 = 8.
  EXPECT_EQ(ids[1 * 4 + 0], 14);
  EXPECT_EQ(ids[1 * 4 + 1], 12);
  EXPECT_EQ(ids[1 * 4 + 2], 10);
  EXPECT_EQ(ids[1 * 4 + 3], 8);
  // t=2: the EOS keeps its look-back: bigram 52 mod 21 = 10; trigram 352 mod 25 = 2, mod 27 = 1.
  EXPECT_EQ(ids[2 * 4 + 0], 10);
  EXPECT_EQ(ids[2 * 4 + 2], 2);
  EXPECT_EQ(ids[2 * 4 + 3], 1);
  // t=3: first token of a new segment sees no history.
  for (int i = 0; i < 4; ++i) EXPECT_EQ(ids[3 * 4 + i], 7);
  // t=4: bigram (7,4) = 74 mod 21 = 11; trigram (0,7,4) = 74 mod 25 = 24.
  EXPECT_EQ(ids[4 * 4 + 0], 11);
  EXPECT_EQ(ids[4 * 4 + 2], 24);
  EXPECT_EQ(ctx.tail, (std::vector<std::int32_t>{7, 4}));
}

TEST(ngram_hash, table_size_at_a_multiple_of_v_collides_bigrams) {
  // With M = k*V, V mod M... (x_t + x_{t-1} * V) mod V = x_t: every bigram ending in the same
  // token collides, the effect the released +2i+1 sizing avoids.
  auto c = test::tiny_config(R"("vocab_size": 10, "emb_neighbor_num": 2, "emb_split_num": 1, "hidden_size": 48,
                                "ngram_table_sizes": [10])");
  ngram_hasher h(c);
  std::vector<std::int64_t> a(2), b(2);
  ngram_context x, y;
  h.hash(std::vector<std::int32_t>{3, 5}, x, a.data());
  h.hash(std::vector<std::int32_t>{8, 5}, y, b.data());
  EXPECT_EQ(a[1], b[1]);
}

TEST(ngram_hash, incremental_equals_full_for_any_split) {
  const auto c = test::tiny_config();
  ngram_hasher h(c);
  std::vector<std::int32_t> tokens;
  for (int i = 0; i < 60; ++i) tokens.push_back((i * 37 + 11) % 97);
  tokens[17] = tokens[40] = tokens[41] = c.eos_token_id;  // documents, including an empty one
  const auto e = static_cast<std::size_t>(h.num_tables());
  std::vector<std::int64_t> full(tokens.size() * e);
  ngram_context ctx;
  h.hash(tokens, ctx, full.data());
  for (std::size_t step : {1u, 2u, 7u, 23u}) {
    std::vector<std::int64_t> part(tokens.size() * e);
    ngram_context c2;
    for (std::size_t b = 0; b < tokens.size(); b += step) {
      const auto n = std::min(step, tokens.size() - b);
      h.hash(std::span<const std::int32_t>(tokens).subspan(b, n), c2, part.data() + b * e);
    }
    EXPECT_EQ(part, full) << "step " << step;
    EXPECT_EQ(c2, ctx);
  }
}

TEST(ngram_hash, large_vocabulary_stays_exact) {
  // Lite sizes: V = 131072, M = 78V + 1; the terms reach ~1e12, checked with 128-bit math.
  auto c = test::tiny_config(R"("vocab_size": 131072, "emb_neighbor_num": 4, "emb_split_num": 1, "hidden_size": 48,
                                "ngram_vocab_size_ratio": 78)");
  ngram_hasher h(c);
  const std::vector<std::int32_t> tokens = {131071, 131070, 131069, 131068};
  std::vector<std::int64_t> ids(4 * 3);
  ngram_context ctx;
  h.hash(tokens, ctx, ids.data());
  const u128 v = 131072, m2 = 78ull * 131072 + 1, m4 = 78ull * 131072 + 5;
  const u128 full4 = 131068 + 131069 * v + 131070 * v * v + (u128)131071 * v * v * v;
  EXPECT_EQ(ids[3 * 3 + 0], static_cast<std::int64_t>((131068 + 131069 * v) % m2));
  EXPECT_EQ(ids[3 * 3 + 2], static_cast<std::int64_t>(full4 % m4));
}

}  // namespace troupe
