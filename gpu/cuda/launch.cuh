// How the inference kernels launch: programmatic dependent launch on Hopper, every launch checked.
// Shared by the kernel files of the CUDA backend (cuda_kernels.cu, mla_flash.cu).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <utility>

#include "gpu/cuda/cuda_check.hpp"

namespace troupe::cuda {

// Programmatic dependent launch (Hopper): every kernel here is launched so that it may start while
// the kernel before it on the stream finishes (launch()). It calls follow_previous() before it
// touches anything but weights: that waits until the previous kernel has finished and its writes
// are visible (and so every kernel before it: each waited in turn), then lets the next kernel
// start, so a kernel's launch and its first weight loads overlap the one before it.
__device__ __forceinline__ void follow_previous() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Launches `kernel` with programmatic stream serialisation (see follow_previous()); the launch
// is checked.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t shared, cudaStream_t s, Args&&... args) {
  cudaLaunchAttribute overlap{};
  overlap.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  overlap.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = shared;
  config.stream = s;
  config.attrs = &overlap;
  config.numAttrs = 1;
  TROUPE_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
}

}  // namespace troupe::cuda
