#include "gpu/make_backend.hpp"

#include "gpu/cpu/cpu_backend.hpp"
#include "protocol/errors.hpp"
#ifdef TROUPE_WITH_CUDA
#include "gpu/cuda/cuda_backend.hpp"
#endif

namespace troupe {

std::optional<int> parse_device(const std::string& device) {
  if (device == "cpu") return std::nullopt;
  if (device != "cuda" && !device.starts_with("cuda:")) throw input_error("unknown device '" + device + "' (cpu, cuda or cuda:N)");
#ifdef TROUPE_WITH_CUDA
  int index = 0;
  try {
    if (device.size() > 5) index = std::stoi(device.substr(5));
  } catch (const std::exception&) {
    throw input_error("device '" + device + "': expected cuda:N");
  }
  if (!cuda_backend::available()) throw input_error("device '" + device + "': no CUDA device is visible");
  return index;
#else
  throw input_error("device '" + device + "': this build has no CUDA stage or backend (nvcc was not found at configure time)");
#endif
}

int visible_gpus() {
#ifdef TROUPE_WITH_CUDA
  return cuda_backend::device_count();
#else
  return 0;
#endif
}

std::unique_ptr<backend> make_backend(const std::string& device, int threads) {
  const auto gpu = parse_device(device);
  if (!gpu) return std::make_unique<cpu_backend>(threads);
#ifdef TROUPE_WITH_CUDA
  return std::make_unique<cuda_backend>(*gpu);
#else
  throw std::logic_error("make_backend: parse_device accepted a GPU without the CUDA backend");
#endif
}

}  // namespace troupe
