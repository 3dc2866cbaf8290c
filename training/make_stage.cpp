#include "protocol/errors.hpp"
#include "training/cpu_stage.hpp"
#ifdef TROUPE_WITH_CUDA
#include "gpu/cuda/cuda_backend.hpp"
#include "training/cuda/cuda_stage.hpp"
#endif

namespace troupe::train {

std::unique_ptr<stage_compute> make_stage_compute(const model_config& config, const stage_range& range,
                                                  const std::string& device, const std::string& math) {
  if (device == "cpu") return std::make_unique<cpu_stage>(config, range);
  if (device == "cuda" || device.starts_with("cuda:")) {
#ifdef TROUPE_WITH_CUDA
    int index = 0;
    try {
      if (device.size() > 5) index = std::stoi(device.substr(5));
    } catch (const std::exception&) {
      throw input_error("device '" + device + "': expected cuda:N");
    }
    if (!cuda_backend::available()) throw input_error("device '" + device + "': no CUDA device is visible");
    return std::make_unique<cuda_stage>(config, range, parse_gemm_math(math), index);
#else
    (void)math;
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

}  // namespace troupe::train
