// Reading and writing safetensors checkpoints, single-file or sharded with
// `model.safetensors.index.json` (the Hugging Face layout).
// Invariant: tensors returned by a reader are zero-copy views into the memory-mapped file and
// keep the mapping alive; a reader never hands out a view that reaches past the file's end.
// Every error names the file and, where one is involved, the tensor.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "gpu/tensor.hpp"

namespace troupe {

struct safetensors_entry {
  std::string name;
  std::string dtype_name;  // as in the header ("BF16", ...)
  bool supported = false;  // dtype is one Troupe reads
  dtype type = dtype::f32;
  shape_t shape;
  std::uint64_t begin = 0, end = 0;  // byte range within the data section
};

/// One memory-mapped .safetensors file with a validated header.
class safetensors_file {
 public:
  /// Maps and validates `path`; throws input_error on a corrupt header or truncated file.
  static safetensors_file open(const std::filesystem::path& path);

  const std::filesystem::path& path() const { return path_; }
  const std::map<std::string, safetensors_entry>& entries() const { return entries_; }
  bool contains(const std::string& name) const { return entries_.count(name) != 0; }
  /// Zero-copy view of a tensor.
  tensor get(const std::string& name) const;

 private:
  std::filesystem::path path_;
  std::shared_ptr<void> mapping_;
  const std::byte* data_ = nullptr;  // start of the data section
  std::map<std::string, safetensors_entry> entries_;
};

/// A checkpoint directory: `model.safetensors`, or shards named by the index file.
class checkpoint {
 public:
  static checkpoint open(const std::filesystem::path& dir);

  bool contains(const std::string& name) const { return where_.count(name) != 0; }
  std::vector<std::string> names() const;
  /// The tensor `name`, checked against the expected shape; the dtype must be a float type.
  tensor get(const std::string& name, const shape_t& expected_shape) const;
  /// The file holding `name` (for messages).
  std::filesystem::path file_of(const std::string& name) const;

 private:
  std::filesystem::path dir_;
  std::vector<safetensors_file> files_;
  std::map<std::string, std::size_t> where_;  // tensor name -> index in files_
};

/// Writes one .safetensors file (through a temporary name, like write_checkpoint).
void write_safetensors(const std::filesystem::path& path, const std::vector<std::pair<std::string, tensor>>& tensors);

/// Writes `tensors` (in order) as a checkpoint into `dir`: one `model.safetensors` when they
/// fit in `max_shard_bytes`, else `model-0000k-of-0000n.safetensors` shards plus the index.
/// Each file is written to a temporary name and renamed, so a failed write never leaves a
/// half-written file under a real name.
void write_checkpoint(const std::filesystem::path& dir, const std::vector<std::pair<std::string, tensor>>& tensors,
                      std::uint64_t max_shard_bytes = 2ull << 30);

}  // namespace troupe
