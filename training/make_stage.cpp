#include "protocol/errors.hpp"
#include "training/cpu_stage.hpp"
#ifdef TROUPE_WITH_CUDA
#include "gpu/cuda/cuda_backend.hpp"
#include "training/cuda/cuda_stage.hpp"
#include "training/cuda/device_group.hpp"
#endif

#include <set>

namespace troupe::train {

namespace {

int cuda_index(const std::string& device) {
  try {
    return device.size() > 5 ? std::stoi(device.substr(5)) : 0;
  } catch (const std::exception&) {
    throw input_error("device '" + device + "': expected cuda:N");
  }
}

}  // namespace

std::unique_ptr<stage_compute> make_stage_compute(const model_config& config, const stage_range& range,
                                                  const std::string& device, const std::string& math,
                                                  std::shared_ptr<device_group> group, int rank) {
  if (device == "cpu") return std::make_unique<cpu_stage>(config, range);
  if (device == "cuda" || device.starts_with("cuda:")) {
#ifdef TROUPE_WITH_CUDA
    if (!cuda_backend::available()) throw input_error("device '" + device + "': no CUDA device is visible");
    return std::make_unique<cuda_stage>(config, range, parse_gemm_math(math), cuda_index(device), std::move(group), rank);
#else
    (void)math;
    (void)group;
    (void)rank;
    throw input_error("device '" + device + "': this build has no CUDA stage (nvcc was not found at configure time)");
#endif
  }
  throw input_error("unknown device '" + device + "' (cpu, cuda or cuda:N)");
}

std::string place_stage(const std::string& device, std::int64_t index) {
  if (device == "cpu") return device;
  if (device == "cuda" || device.starts_with("cuda:")) {
#ifdef TROUPE_WITH_CUDA
    const int count = cuda_backend::device_count();
    if (count == 0) throw input_error("device '" + device + "': no CUDA device is visible");
    if (device != "cuda") return device;
    return "cuda:" + std::to_string(index % count);
#else
    (void)index;
    throw input_error("device '" + device + "': this build has no CUDA stage (nvcc was not found at configure time)");
#endif
  }
  throw input_error("unknown device '" + device + "' (cpu, cuda or cuda:N)");
}

std::shared_ptr<device_group> make_device_group(const std::vector<std::string>& devices) {
#ifdef TROUPE_WITH_CUDA
  if (devices.size() < 2) return nullptr;
  std::vector<int> indices;
  for (const auto& d : devices) {
    if (!d.starts_with("cuda")) return nullptr;
    indices.push_back(cuda_index(d));
  }
  if (std::set<int>(indices.begin(), indices.end()).size() != indices.size()) return nullptr;
  return open_device_group(indices);
#else
  (void)devices;
  return nullptr;
#endif
}

}  // namespace troupe::train
