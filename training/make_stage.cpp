#include <set>

#include "gpu/make_backend.hpp"
#include "protocol/errors.hpp"
#include "training/cpu_stage.hpp"
#ifdef TROUPE_WITH_CUDA
#include "training/cuda/cuda_stage.hpp"
#include "training/cuda/device_group.hpp"
#endif

namespace troupe::train {

std::unique_ptr<stage_compute> make_stage_compute(const model_config& config, const stage_range& range,
                                                  const std::string& device, const std::string& math,
                                                  std::shared_ptr<device_group> group, int rank) {
  const auto gpu = parse_device(device);
  if (!gpu) return std::make_unique<cpu_stage>(config, range);
#ifdef TROUPE_WITH_CUDA
  return std::make_unique<cuda_stage>(config, range, parse_gemm_math(math), *gpu, std::move(group), rank);
#else
  (void)math;
  (void)group;
  (void)rank;
  throw std::logic_error("make_stage_compute: parse_device accepted a GPU without the CUDA backend");
#endif
}

std::string place_stage(const std::string& device, std::int64_t index) {
  if (!parse_device(device)) return device;
  if (device != "cuda") return device;
  return "cuda:" + std::to_string(index % visible_gpus());
}

std::shared_ptr<device_group> make_device_group(const std::vector<std::string>& devices) {
#ifdef TROUPE_WITH_CUDA
  if (devices.size() < 2 || visible_gpus() == 0) return nullptr;
  std::vector<int> indices;
  for (const auto& d : devices) {
    const auto gpu = parse_device(d);
    if (!gpu) return nullptr;
    indices.push_back(*gpu);
  }
  if (std::set<int>(indices.begin(), indices.end()).size() != indices.size()) return nullptr;
  return open_device_group(indices);
#else
  (void)devices;
  return nullptr;
#endif
}

}  // namespace troupe::train
