// The LongCat-Flash(-Lite) forward pass: n-gram embedding, ScMoE blocks of MLA + dense
// SwiGLU + routed experts, final norm and head (spec: model.md sections 2-5).
//
// One path serves prefill and decode: every step appends the new tokens' compressed latents to
// each sequence's cache and attends over it with kv_b absorbed. Invariant: feeding a sequence
// in any number of steps gives the logits of one full prefill (up to float rounding) and
// exactly the same n-gram ids, because the N-gram cache and the latent cache travel with the
// sequence_state.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <span>
#include <vector>

#include "gpu/backend.hpp"
#include "model/config.hpp"
#include "model/ngram_hash.hpp"
#include "model/weights.hpp"

namespace troupe {

/// Everything the model keeps for one live sequence between steps.
struct sequence_state {
  ngram_context ngram;          // the N-gram cache: last N-1 tokens of the current segment
  std::vector<tensor> latents;  // per attention layer [capacity, kv_lora + rope] on the backend
  std::int64_t num_tokens = 0;  // tokens already in the caches
};

/// One sequence's share of a step: its state and the tokens it adds.
struct step_input {
  sequence_state* state;
  std::span<const std::int32_t> tokens;
};

enum class logits_mode : std::uint8_t { last_token, all_tokens };

class model {
 public:
  model(model_config config, model_weights weights, backend& be);

  /// Loads `dir` (config.json + safetensors) onto `be`.
  static std::unique_ptr<model> load(const std::filesystem::path& dir, backend& be);

  const model_config& config() const { return config_; }
  backend& compute() const { return be_; }

  /// Runs one step for a batch of sequences and returns float32 host logits:
  /// [num_sequences, V] for last_token, [total new tokens, V] for all_tokens.
  tensor forward(std::span<const step_input> batch, logits_mode mode);

  /// The n-gram ids the step would use for `tokens` after `context` (diagnostics and tests).
  std::vector<std::int64_t> ngram_ids(std::span<const std::int32_t> tokens, ngram_context context) const;

 private:
  struct step;  // per-call row layout and scratch
  tensor embed(step& s);
  tensor attention(const mla_weights& w, std::int64_t layer, const tensor& x, step& s);
  tensor swiglu(const swiglu_weights& w, const tensor& x);
  tensor moe(const block_weights& w, const tensor& u);
  tensor norm(const tensor& x, const tensor& w);

  model_config config_;
  model_weights weights_;
  backend& be_;
  ngram_hasher hasher_;
  rope_params rope_;
  float softmax_scale_;
};

}  // namespace troupe
