// Picks a backend by name: "cpu", or "cuda" / "cuda:N" where the CUDA backend was built (nvcc
// found at configure time) and a GPU is visible. The one place that knows which backends exist.
#pragma once

#include <memory>
#include <string>

#include "gpu/backend.hpp"

namespace troupe {

/// `threads`: CPU threads (0 = all cores; ignored by the GPU). Throws input_error naming the
/// device when it is unknown, not built in, or not present.
std::unique_ptr<backend> make_backend(const std::string& device, int threads);

}  // namespace troupe
