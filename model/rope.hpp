// RoPE frequencies and scales from the config: plain RoPE, or YaRN as transformers computes it
// (DeepSeek-style mscale), so the same checkpoint gives the same angles everywhere.
#pragma once

#include "gpu/backend.hpp"

namespace troupe {

struct model_config;

/// inv_freq over qk_rope_head_dim and the cos/sin attention factor.
rope_params make_rope_params(const model_config& config);
/// Softmax scale of MLA: (nope + rope)^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN.
float mla_softmax_scale(const model_config& config);

}  // namespace troupe
