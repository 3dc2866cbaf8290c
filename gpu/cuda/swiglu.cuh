// SwiGLU of one gate and up value, as the CPU computes it; shared by the kernels that end in it.
#pragma once

namespace troupe::cuda {

__device__ __forceinline__ float swiglu_value(float g, float u) { return g / (1.0f + expf(-g)) * u; }

}  // namespace troupe::cuda
