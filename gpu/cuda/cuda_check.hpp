// Checking every CUDA runtime call and kernel launch: a failure throws with the call, the file
// and the line, so an actor can turn it into an error reply instead of dying silently.
#pragma once

#include <cuda_runtime_api.h>

#include <stdexcept>
#include <string>

namespace troupe {

[[noreturn]] inline void cuda_fail(cudaError_t err, const char* what, const char* file, int line) {
  throw std::runtime_error(std::string("CUDA error: ") + cudaGetErrorString(err) + " in " + what + " at " + file + ":" +
                           std::to_string(line));
}

}  // namespace troupe

#define TROUPE_CUDA_CHECK(call)                                                       \
  do {                                                                                \
    const cudaError_t troupe_err_ = (call);                                           \
    if (troupe_err_ != cudaSuccess) ::troupe::cuda_fail(troupe_err_, #call, __FILE__, __LINE__); \
  } while (0)

/// After a kernel launch: reports launch-configuration errors at the launch site.
#define TROUPE_CUDA_CHECK_LAUNCH() TROUPE_CUDA_CHECK(cudaGetLastError())
