// The device all-reduce of same-depth training stages, one GPU each, in this process: an NCCL
// communicator per rank (ncclCommInitAll). Without NCCL in the build, open_device_group()
// returns null and the stages all-reduce through actor messages.
#pragma once

#include <memory>
#include <vector>

#include "training/stage_compute.hpp"

namespace troupe::train {

/// A group over GPUs `devices` (distinct), rank i on devices[i]; null without NCCL.
std::shared_ptr<device_group> open_device_group(const std::vector<int>& devices);

/// Sums (in place, on `stream`) what a stage contributes to its replicas' all-reduce: float32
/// arrays, byte arrays reduced by max (touched rows) and int64 arrays by sum (expert loads), as
/// one NCCL group call. Collective: every rank calls it with the same sizes.
struct reduce_item {
  enum class kind : std::uint8_t { f32_sum, u8_max, i64_sum } type;
  void* data;
  std::size_t count;
};
void all_reduce(device_group& group, int rank, const std::vector<reduce_item>& items, void* stream);

}  // namespace troupe::train
