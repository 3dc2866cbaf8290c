#include "gpu/make_backend.hpp"

#include "gpu/cpu/cpu_backend.hpp"
#include "protocol/errors.hpp"
#ifdef TROUPE_WITH_CUDA
#include "gpu/cuda/cuda_backend.hpp"
#endif

namespace troupe {

std::unique_ptr<backend> make_backend(const std::string& device, int threads) {
  if (device == "cpu") return std::make_unique<cpu_backend>(threads);
  if (device == "cuda" || device.starts_with("cuda:")) {
#ifdef TROUPE_WITH_CUDA
    int index = 0;
    try {
      if (device.size() > 5) index = std::stoi(device.substr(5));
    } catch (const std::exception&) {
      throw input_error("device '" + device + "': expected cuda:N");
    }
    if (!cuda_backend::available()) throw input_error("device '" + device + "': no CUDA device is visible");
    return std::make_unique<cuda_backend>(index);
#else
    throw input_error("device '" + device + "': this build has no CUDA backend (nvcc was not found at configure time)");
#endif
  }
  throw input_error("unknown device '" + device + "' (cpu, cuda or cuda:N)");
}

}  // namespace troupe
