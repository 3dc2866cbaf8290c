#include "gpu/backend.hpp"

#include <stdexcept>

namespace troupe {

void backend::ngram_embed(const tensor& base, const tensor& tokens, const tensor& ngram_ids, std::span<const tensor> tables,
                          std::span<const tensor> projections, tensor& out) {
  const auto t = tokens.numel();
  const auto num_tables = static_cast<std::int64_t>(tables.size());
  if (ngram_ids.rank() != 2 || ngram_ids.dim(0) != t || ngram_ids.dim(1) != num_tables ||
      tokens.where().kind != device_kind::cpu || ngram_ids.where().kind != device_kind::cpu)
    throw std::invalid_argument("backend::ngram_embed: host n-gram ids " + shape_to_string(ngram_ids.shape()) + " for " +
                                std::to_string(t) + " host tokens and " + std::to_string(num_tables) + " tables");
  tensor ids = tensor::empty({t}, dtype::i64);
  for (std::int64_t r = 0; r < t; ++r) {
    const auto token = tokens.data<std::int32_t>()[r];
    if (token < 0 || token >= base.dim(0))
      throw std::invalid_argument("backend::ngram_embed: token id " + std::to_string(token) + " outside the vocabulary");
    ids.data<std::int64_t>()[r] = token;
  }
  gather_rows(base, ids, out);
  if (num_tables == 0) return;
  const auto* all = ngram_ids.data<std::int64_t>();
  for (std::int64_t i = 0; i < num_tables; ++i) {
    for (std::int64_t r = 0; r < t; ++r) ids.data<std::int64_t>()[r] = all[r * num_tables + i];
    tensor rows = empty({t, tables[i].dim(1)}, dtype::f32);
    gather_rows(tables[i], ids, rows);
    linear(rows, projections[i], out, write_mode::accumulate);
  }
  scale(out, 1.0f / static_cast<float>(1 + num_tables));
}

backend::recording backend::record(const std::function<tensor()>&) {
  throw std::logic_error("backend " + name() + " cannot record ops (records() is false)");
}

}  // namespace troupe
