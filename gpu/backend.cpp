#include "gpu/backend.hpp"

#include <stdexcept>

namespace troupe {

void backend::check_ngram_embed_args(const tensor& tokens, const tensor& ngram_ids, std::size_t tables) {
  const auto t = tokens.numel();
  const auto num_tables = static_cast<std::int64_t>(tables);
  if (tokens.type() != dtype::i64 || (num_tables && (ngram_ids.type() != dtype::i64 || ngram_ids.rank() != 2 ||
                                                     ngram_ids.dim(0) != num_tables || ngram_ids.dim(1) != t)))
    throw std::invalid_argument("backend::ngram_embed: n-gram ids " + shape_to_string(ngram_ids.shape()) + " for " +
                                std::to_string(t) + " i64 tokens and " + std::to_string(num_tables) + " tables (want [E, T])");
}

void backend::ngram_embed(const tensor& base, const tensor& tokens, const tensor& ngram_ids, std::span<const tensor> tables,
                          std::span<const tensor> projections, tensor& out) {
  check_ngram_embed_args(tokens, ngram_ids, tables.size());
  const auto t = tokens.numel();
  const auto num_tables = static_cast<std::int64_t>(tables.size());
  gather_rows(base, tokens, out);
  for (std::int64_t i = 0; i < num_tables; ++i) {
    tensor rows = empty({t, tables[i].dim(1)}, dtype::f32);
    gather_rows(tables[i], ngram_ids.rows(i, i + 1).reshape({t}), rows);
    linear(rows, projections[i], out, write_mode::accumulate);
  }
  if (num_tables) scale(out, 1.0f / static_cast<float>(1 + num_tables));
}

void backend::ngram_embed_next(device_ngram& cache, const tensor& next, const tensor& base, const tensor& tokens,
                               tensor& ngram_ids, std::span<const tensor> tables, std::span<const tensor> projections,
                               tensor& out) {
  cache.hash_next(next, ngram_ids);
  ngram_embed(base, tokens, ngram_ids, tables, projections, out);
}

void backend::linear_pair(const tensor& x, const tensor& w1, tensor& y1, const tensor& w2, tensor& y2) {
  linear(x, w1, y1, write_mode::overwrite);
  linear(x, w2, y2, write_mode::overwrite);
}

void backend::linear_swiglu(const tensor& x, const tensor& w, tensor& act) {
  tensor gate_up = empty({x.dim(0), w.dim(0)}, dtype::f32);
  linear(x, w, gate_up, write_mode::overwrite);
  swiglu(gate_up, act);
}

void backend::sample(const tensor& logits, std::span<const token_draw> draws, tensor& tokens) {
  const auto d = static_cast<std::int64_t>(draws.size());
  if (logits.type() != dtype::f32 || logits.rank() != 2 || tokens.type() != dtype::i32 || tokens.numel() != d)
    throw std::invalid_argument("backend::sample: logits " + shape_to_string(logits.shape()) + " and tokens " +
                                shape_to_string(tokens.shape()) + " for " + std::to_string(d) + " draws");
  const tensor host = logits.where().kind == device_kind::cpu ? logits : download(logits);
  const auto vocab = static_cast<std::size_t>(host.dim(1));
  tensor picked = tensor::empty({d}, dtype::i32);
  for (std::int64_t i = 0; i < d; ++i) {
    const token_draw& draw = draws[static_cast<std::size_t>(i)];
    if (draw.row < 0 || draw.row >= host.dim(0))
      throw std::out_of_range("backend::sample: row " + std::to_string(draw.row) + " of " + std::to_string(host.dim(0)));
    picked.data<std::int32_t>()[i] = sample_token({host.data<float>() + draw.row * vocab, vocab}, draw);
  }
  tensor column = tokens.reshape({d, 1});  // copy_rows takes rows
  copy_rows(upload(picked, dtype::i32).reshape({d, 1}), column, 0);
}

void backend::argmax(const tensor& logits, tensor& ids) {
  const std::int64_t rows = logits.rank() == 2 ? logits.dim(0) : -1;
  if (logits.type() != dtype::f32 || ids.numel() != rows || (ids.type() != dtype::i32 && ids.type() != dtype::i64))
    throw std::invalid_argument("backend::argmax: logits " + shape_to_string(logits.shape()) + " and ids " +
                                shape_to_string(ids.shape()) + " (i32 or i64, one per row)");
  const tensor host = logits.where().kind == device_kind::cpu ? logits : download(logits);
  const auto vocab = static_cast<std::size_t>(host.dim(1));
  tensor picked = tensor::empty({rows, 1}, ids.type());
  token_draw greedy;
  greedy.params.temperature = 0;
  for (std::int64_t r = 0; r < rows; ++r) {
    const std::int32_t id = sample_token({host.data<float>() + r * static_cast<std::int64_t>(vocab), vocab}, greedy);
    if (ids.type() == dtype::i32) picked.data<std::int32_t>()[r] = id;
    else picked.data<std::int64_t>()[r] = id;
  }
  tensor column = ids.reshape({rows, 1});  // copy_rows takes rows
  copy_rows(ids.where() == picked.where() ? picked : upload(picked, ids.type()), column, 0);
}

void backend::concurrently(const std::function<void()>& side, const std::function<void()>& main) {
  side();
  main();
}

backend::recording backend::record(const std::function<tensor()>&) {
  throw std::logic_error("backend " + name() + " cannot record ops (records() is false)");
}

}  // namespace troupe
