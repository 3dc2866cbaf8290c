// NumPy .npy files (format 1.0, little-endian, C order) for handing tensors to outside tools.
#pragma once

#include <filesystem>

#include "gpu/tensor.hpp"

namespace troupe {

/// Writes a host tensor (f32, f16, i32 or i64) as .npy; throws input_error if the write fails.
void write_npy(const std::filesystem::path& path, const tensor& t);
/// Reads a float32 or int .npy written by NumPy or write_npy.
tensor read_npy(const std::filesystem::path& path);

}  // namespace troupe
