// The model's layers for training: each forward keeps what its backward needs in a cache
// struct, and each backward turns the output gradient into the input gradient while adding
// the parameter gradients (spec: model.md sections 2-5; the same function as model/model.cpp).
//
// Invariant: forward computes exactly the inference function (same formulas, same router
// selection rule, same hashing), so a trained checkpoint serves as trained; backward adds
// (+=) into parameter gradients and into the input gradient it is handed.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "gpu/tensor.hpp"
#include "model/config.hpp"
#include "training/dense.hpp"

namespace troupe::train {

/// How the optimizer treats a parameter.
enum class param_role : std::uint8_t {
  matrix,       // AdamW with weight decay
  norm,         // AdamW, no weight decay
  table,        // embedding / n-gram table: lazy AdamW on the rows touched, no weight decay
  router_bias,  // not trained by gradients: the balancing update moves it
};

/// One named tensor of the checkpoint with its gradient.
template <class T>
struct parameter {
  std::string name;
  shape_t shape;
  param_role role = param_role::matrix;
  buffer<T> value, grad;
  std::vector<std::uint8_t> touched;  // tables: rows given a gradient since the last step

  std::int64_t rows() const { return shape[0]; }
  std::int64_t cols() const { return shape.size() > 1 ? shape[1] : 1; }
  std::span<const T> v() const { return value; }
  std::span<T> g() { return grad; }
};

/// Rows of a micro-batch: `sequences` sequences of `seq_len` tokens each, row = s * seq_len + t.
struct batch_dims {
  std::int64_t sequences = 0, seq_len = 0;
  std::int64_t rows() const { return sequences * seq_len; }
};

template <class T>
struct rms_norm_layer {
  parameter<T>* weight = nullptr;
  T eps = T(1e-5);

  struct cache {
    buffer<T> x, rms_inv;
  };
  buffer<T> forward(std::span<const T> x, std::int64_t rows, cache& c) const;
  void backward(std::span<const T> dy, const cache& c, std::int64_t rows, std::span<T> dx) const;
};

template <class T>
struct swiglu_layer {
  parameter<T>*gate = nullptr, *up = nullptr, *down = nullptr;

  struct cache {
    buffer<T> x, gate, up, act;
  };
  buffer<T> forward(std::span<const T> x, std::int64_t rows, cache& c) const;
  void backward(std::span<const T> dy, const cache& c, std::int64_t rows, std::span<T> dx) const;
};

/// MLA attention over whole sequences (causal), in the explicit (non-absorbed) form.
template <class T>
struct mla_layer {
  parameter<T>*q_a = nullptr, *q_a_norm = nullptr, *q_b = nullptr;  // q_b is q_proj without q-LoRA
  parameter<T>*kv_a = nullptr, *kv_a_norm = nullptr, *kv_b = nullptr, *o = nullptr;
  const model_config* config = nullptr;
  const rope_table<T>* rope = nullptr;  // per row of the micro-batch
  T softmax_scale = 1;

  struct cache {
    buffer<T> x, q_lat, q_lat_rms, q_ln, q, kv, kv_rms, k_lat, kvb, probs, attn;
  };
  buffer<T> forward(std::span<const T> x, const batch_dims& dims, cache& c) const;
  void backward(std::span<const T> dy, const cache& c, const batch_dims& dims, std::span<T> dx) const;
};

/// Router (softmax, biased top-k, scaled gates) and the experts; zero experts pass u through.
template <class T>
struct moe_layer {
  parameter<T>*router = nullptr, *router_bias = nullptr;
  std::vector<swiglu_layer<T>> experts;
  const model_config* config = nullptr;

  struct cache {
    buffer<T> u, probs, gates;                        // probs [T, E], gates [T, k]
    std::vector<std::int32_t> choice;                 // [T, k] router expert ids
    std::vector<std::vector<std::int32_t>> rows;      // per expert: rows routed to it
    std::vector<std::vector<std::int32_t>> slots;     // per expert: j of each row's choice
    std::vector<typename swiglu_layer<T>::cache> expert;
    std::vector<buffer<T>> expert_out;                // per routed expert [rows, H]
  };
  buffer<T> forward(std::span<const T> u, std::int64_t rows, cache& c) const;
  void backward(std::span<const T> dy, const cache& c, std::int64_t rows, std::span<T> du) const;
};

/// Base embedding plus, for n-gram models, the hashed tables and their projections, then the
/// optional amplification (spec section 2).
template <class T>
struct embedding_layer {
  parameter<T>* base = nullptr;
  std::vector<parameter<T>*> tables, projections;
  const model_config* config = nullptr;

  struct cache {
    std::vector<std::int32_t> tokens;
    std::vector<std::int64_t> ngram_ids;    // [T, tables]
    std::vector<buffer<T>> gathered;        // per table [T, d]
    buffer<T> merged, std_inv;              // before amplification (layer_norm needs it)
    buffer<T> out;                          // after
  };
  buffer<T> forward(std::span<const std::int32_t> tokens, const batch_dims& dims, cache& c) const;
  void backward(std::span<const T> dy, const cache& c, const batch_dims& dims) const;
};

/// Final norm, lm_head and cross-entropy, in chunks of rows so the full logits never exist.
template <class T>
struct head_layer {
  parameter<T>*norm = nullptr, *lm_head = nullptr;
  T eps = T(1e-5);
  std::int64_t chunk_rows = 256;

  /// Sum over rows of loss * weight (targets < 0 are skipped); fills dh (+=) when not empty.
  double loss_and_backward(std::span<const T> h, std::span<const std::int32_t> targets, std::int64_t rows, T weight,
                           std::span<T> dh) const;
};

}  // namespace troupe::train
