// Picks a backend by name: "cpu", or "cuda" / "cuda:N" where the CUDA backend was built (nvcc
// found at configure time) and a GPU is visible. The one place that knows which backends exist.
#pragma once

#include <memory>
#include <optional>
#include <string>

#include "gpu/backend.hpp"

namespace troupe {

/// `threads`: CPU threads (0 = all cores; ignored by the GPU). Throws input_error naming the
/// device when it is unknown, not built in, or not present.
std::unique_ptr<backend> make_backend(const std::string& device, int threads);

/// The GPU a device name picks: nullopt for "cpu", N for "cuda:N", 0 for "cuda". Throws
/// input_error when the name is unknown or malformed, the build has no CUDA backend, or no GPU
/// is visible. (The training stages pick their devices by the same names.)
std::optional<int> parse_device(const std::string& device);
/// GPUs this process sees (0 without the CUDA backend).
int visible_gpus();

}  // namespace troupe
