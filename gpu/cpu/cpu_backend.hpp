// The CPU backend: float32 compute, OpenBLAS for float32 matrix products, a streaming kernel
// for bf16 weights (decode reads half the bytes), a caching allocator, synchronous ops.
// Invariant: an op's result for one sequence's rows never depends on the other rows of the
// call except through GEMM blocking, so batching changes rounding at most in the last bits.
#pragma once

#include <memory>

#include "gpu/backend.hpp"

namespace troupe {

class host_allocator;
class thread_pool;

class cpu_backend final : public backend {
 public:
  /// `num_threads` = 0 uses every core.
  explicit cpu_backend(int num_threads = 0);
  ~cpu_backend() override;
  int num_threads() const;

  device where() const override { return {}; }
  std::string name() const override { return "cpu"; }

  tensor empty(shape_t shape, dtype type) override;
  tensor upload(const tensor& host, dtype type) override;
  dtype weight_type(dtype stored) const override { return stored == dtype::bf16 ? dtype::bf16 : dtype::f32; }
  tensor download(const tensor& t) override;
  void copy_rows(const tensor& src, tensor& dst, std::int64_t dst_row) override;
  void synchronize() override {}

  void linear(const tensor& x, const tensor& w, tensor& y, write_mode mode) override;
  void rms_norm(const tensor& x, const tensor& w, float eps, tensor& y) override;
  void add_rms_norm(tensor& y, const tensor& x, const tensor& w, float eps, tensor& normed) override;
  void layer_norm(const tensor& x, float eps, tensor& y) override;
  void zero(tensor& y) override;
  void scale(tensor& y, float s) override;
  void add(tensor& y, const tensor& x) override;
  void swiglu(const tensor& gate_up, tensor& out) override;
  void gather_rows(const tensor& table, const tensor& ids, tensor& out) override;
  void scatter_add_rows(const tensor& x, const tensor& rows, const tensor& weights, tensor& out) override;
  void write_latents(tensor& kv, const latent_norm& norm, const rope_table& rope, const paged_latents& where) override;
  void mla_attention(const tensor& q, const tensor& kv_b, const paged_latents& cache, const mla_dims& dims,
                     const rope_table& rope, float softmax_scale, tensor& out) override;
  void router_topk(const tensor& logits, const tensor& bias, int k, float scaling, tensor& idx,
                   tensor& weights) override;
  std::int64_t routed_moe_rows() const override { return 0; }  // batched host routing is as fast here
  void routed_moe(const tensor& u, const moe_layer& moe, tensor& out, write_mode mode) override;

 private:
  std::shared_ptr<host_allocator> alloc_;
  std::unique_ptr<thread_pool> pool_;
};

}  // namespace troupe
