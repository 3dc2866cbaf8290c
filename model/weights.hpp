// The model's parameters in the released checkpoint layout (spec: model.md section 7), and
// how they are loaded onto a backend.
// Invariant: weight_specs() is the single list of tensor names and shapes; init-model writes
// exactly it, the loader reads exactly it, and the PyTorch reference reads the same names.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "gpu/dtype.hpp"
#include "gpu/tensor.hpp"

namespace troupe {

struct model_config;
class backend;
class checkpoint;

/// How a freshly initialised tensor is filled.
enum class weight_init : std::uint8_t {
  matrix,     // normal(0, 1/sqrt(fan_in)), fan_in = last dimension
  embedding,  // normal(0, 1)
  norm,       // 1 + normal(0, 0.1): random enough that swapped norms are caught by tests
  bias,       // normal(0, 0.01)
};

struct weight_spec {
  std::string name;
  shape_t shape;
  weight_init init;
  bool keep_f32;  // stored as float32 whatever the checkpoint dtype (the router)
};

/// Every tensor of a model with this config, in checkpoint order.
std::vector<weight_spec> weight_specs(const model_config& config);

struct mla_weights {
  tensor q_a, q_a_norm, q_b;  // [q_lora, H], [q_lora], [heads*qk, q_lora]; or q_b = q_proj [heads*qk, H]
  tensor kv_a;                // [kv_lora + rope, H]
  tensor kv_a_norm;           // [kv_lora]
  tensor kv_b;                // [heads*(nope+v), kv_lora]
  tensor o;                   // [H, heads*v]
};

struct swiglu_weights {
  tensor gate_up;  // [2F, H]: gate rows then up rows
  tensor down;     // [H, F]
};

struct block_weights {
  tensor input_norm[2], post_attention_norm[2];  // [H]
  mla_weights attention[2];
  swiglu_weights mlp[2];
  tensor router;       // [n_routed + zero, H] float32
  tensor router_bias;  // [n_routed + zero] float32 (e_score_correction_bias)
  std::vector<swiglu_weights> experts;  // n_routed
};

/// The MTP head (spec section 6): x = eh_proj([enorm(embed(t)); hnorm(h)]) split into its
/// two column halves, then one dense MLA + SwiGLU layer and its own final norm.
struct mtp_weights {
  tensor enorm, hnorm;         // [H]
  tensor eh_embed, eh_hidden;  // [H, H] each: eh_proj's columns for the embedding, for the hidden state
  tensor input_norm, post_attention_norm;  // [H]
  mla_weights attention;
  swiglu_weights mlp;
  tensor norm;  // [H]
};

struct model_weights {
  tensor embed;                      // [V, H], read in place (may be a bf16 checkpoint view)
  std::vector<tensor> ngram_tables;  // [M_i, d], read in place
  std::vector<tensor> ngram_projections;  // [H, d]
  std::vector<block_weights> blocks;
  tensor final_norm;  // [H]
  tensor lm_head;     // [V, H]
  std::vector<mtp_weights> mtp;  // num_nextn_predict_layers of them (0 or 1)
};

/// Where the embedding and n-gram tables live: `host` reads them in place from the memory-mapped
/// checkpoint (on a GPU only the gathered rows cross the bus); `device` copies them to the
/// backend's memory in their checkpoint dtype.
enum class table_placement : std::uint8_t { host, device };
/// "host" or "device"; throws input_error otherwise.
table_placement parse_table_placement(const std::string& name);

/// Loads and checks every tensor; matrices go to the backend in its weight type (bf16 stays
/// bf16 on the CPU), norms, router and kv_b as float32; embedding and n-gram tables where
/// `tables` says.
model_weights load_model_weights(const checkpoint& ckpt, const model_config& config, backend& be,
                                 table_placement tables = table_placement::host);

}  // namespace troupe
