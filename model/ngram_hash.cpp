#include "model/ngram_hash.hpp"

#include "model/config.hpp"

namespace troupe {
namespace {
__extension__ typedef unsigned __int128 u128;  // products reach ~V * M: beyond 64 bits for large tables
}  // namespace

ngram_hasher::ngram_hasher(const model_config& config)
    : max_order_(config.emb_neighbor_num), eos_(config.eos_token_id) {
  const auto v = static_cast<u128>(config.vocab_size);
  for (std::int64_t i = 0; i < config.num_ngram_tables(); ++i) {
    const std::int64_t m = config.ngram_table_rows(i);
    const std::int64_t n = config.ngram_table_order(i);
    modulus_.push_back(m);
    order_.push_back(n);
    std::vector<std::int64_t> p;
    u128 power = 1;
    for (std::int64_t k = 1; k < n; ++k) {
      power = (power * v) % static_cast<u128>(m);
      p.push_back(static_cast<std::int64_t>(power));
    }
    powers_.push_back(std::move(p));
  }
}

void ngram_hasher::hash(std::span<const std::int32_t> tokens, ngram_context& context, std::int64_t* ids) const {
  const std::size_t e = modulus_.size();
  const std::size_t keep = max_order_ > 0 ? static_cast<std::size_t>(max_order_ - 1) : 0;
  auto& tail = context.tail;
  for (std::size_t t = 0; t < tokens.size(); ++t) {
    const std::int32_t x = tokens[t];
    for (std::size_t i = 0; i < e; ++i) {
      u128 h = static_cast<std::uint32_t>(x);
      const auto& p = powers_[i];
      for (std::size_t k = 1; k <= p.size(); ++k) {
        if (k > tail.size()) break;  // before the segment start: s_k = 0
        h += static_cast<u128>(static_cast<std::uint32_t>(tail[tail.size() - k])) *
             static_cast<std::uint64_t>(p[k - 1]);
      }
      ids[t * e + i] = static_cast<std::int64_t>(h % static_cast<u128>(modulus_[i]));
    }
    if (x == eos_) {
      tail.clear();  // the EOS keeps its look-back; the token after it starts a new segment
    } else if (keep > 0) {
      if (tail.size() == keep) tail.erase(tail.begin());
      tail.push_back(x);
    }
  }
}

}  // namespace troupe
