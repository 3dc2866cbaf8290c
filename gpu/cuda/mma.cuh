// Tensor-core building blocks of the hand-written GEMM-shaped kernels (mla_flash.cu): the
// warp-level bf16 MMA (m16n8k16, float32 accumulators) and asynchronous 16-byte copies from
// global to shared memory.
//
// Fragments of mma_bf16 (g = lane / 4, t = lane % 4; each register two bf16, the lower column
// in the low half):
//   A 16x16, row-major: a[0] (row g, cols 2t, 2t+1), a[1] (row g+8, same cols),
//                       a[2] (row g, cols 2t+8, 2t+9), a[3] (row g+8, cols 2t+8, 2t+9);
//   B 16x8 (k x n):     b[0] (k 2t, 2t+1 of col g), b[1] (k 2t+8, 2t+9 of col g);
//   C 16x8, float:      c[0], c[1] (row g, cols 2t, 2t+1), c[2], c[3] (row g+8, same cols).
// So a B fragment is two 32-bit loads from a matrix stored n-major (each column's k contiguous),
// and the C fragments of two neighbouring n8 tiles form the A fragment of a k16 step.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

namespace troupe::cuda {

__device__ __forceinline__ void mma_bf16(float (&c)[4], const std::uint32_t (&a)[4], std::uint32_t b0, std::uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/// Two floats rounded to bf16 in one register (lo in the low half).
__device__ __forceinline__ std::uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const std::uint32_t*>(&v);
}

/// Two neighbouring bf16 (4-byte aligned) as one register.
__device__ __forceinline__ std::uint32_t load_pair(const __nv_bfloat16* p) {
  return *reinterpret_cast<const std::uint32_t*>(p);
}

/// 16 bytes from global to shared memory without passing through registers; zeros where !valid
/// (src is then not read, but must still be a valid address).
__device__ __forceinline__ void copy_async16(void* dst, const void* src, bool valid) {
  const auto shared = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(shared), "l"(src), "r"(valid ? 16 : 0) : "memory");
}
/// Closes the group of copies issued since the last commit.
__device__ __forceinline__ void commit_copies() { asm volatile("cp.async.commit_group;" ::: "memory"); }
/// Waits until at most `Pending` of the latest committed groups are still in flight.
template <int Pending>
__device__ __forceinline__ void wait_copies() {
  asm volatile("cp.async.wait_group %0;" ::"n"(Pending) : "memory");
}

}  // namespace troupe::cuda
