// The CUDA backend (Hopper first): the model's ops on one GPU, enqueued on one stream.
// Matrices are bf16: up to 4 rows (decode) a GEMV kernel of ours streams them against float32
// activations; more rows go to cuBLAS with bf16 operands (activations rounded on their way in)
// and float32 accumulation. The router's float32 matrix goes through a float32 GEMM.
// Norms, RoPE, SwiGLU, gathers, the router and MLA attention over the paged latent cache are
// kernels of ours (cuda_kernels.cu). Index arguments the model builds on the host (token ids,
// positions, gathered rows) are uploaded by the op; tables that stay in host memory (the
// embedding and n-gram tables of a memory-mapped checkpoint) are gathered on the host and only
// the gathered rows cross the bus.
// Invariant: every CUDA and cuBLAS call is checked; a failure throws naming the call.
#pragma once

#include <deque>
#include <map>
#include <memory>
#include <vector>
#include <mutex>

#include "gpu/backend.hpp"

struct CUstream_st;
struct CUevent_st;
struct cublasContext;

namespace troupe {

struct ngram_cache_view;

class cuda_backend final : public backend {
 public:
  /// Uses GPU `index`; throws when there is none.
  explicit cuda_backend(int index = 0);
  ~cuda_backend() override;
  cuda_backend(const cuda_backend&) = delete;
  cuda_backend& operator=(const cuda_backend&) = delete;

  /// Whether this process sees a CUDA device (tests skip without one), and how many.
  static bool available();
  static int device_count();

  device where() const override { return {device_kind::cuda, index_}; }
  std::string name() const override;

  tensor empty(shape_t shape, dtype type) override;
  tensor upload(const tensor& host, dtype type) override;
  dtype weight_type(dtype) const override { return dtype::bf16; }
  dtype kv_b_type(dtype) const override { return dtype::bf16; }  // as the checkpoints store it: half the bytes
  tensor download(const tensor& t) override;
  void copy_rows(const tensor& src, tensor& dst, std::int64_t dst_row) override;
  void synchronize() override;

  void linear(const tensor& x, const tensor& w, tensor& y, write_mode mode) override;
  void rms_norm(const tensor& x, const tensor& w, float eps, tensor& y) override;
  void add_rms_norm(tensor& y, const tensor& x, const tensor& w, float eps, tensor& normed) override;
  void layer_norm(const tensor& x, float eps, tensor& y) override;
  void zero(tensor& y) override;
  void scale(tensor& y, float s) override;
  void add(tensor& y, const tensor& x) override;
  void swiglu(const tensor& gate_up, tensor& out) override;
  void linear_pair(const tensor& x, const tensor& w1, tensor& y1, const tensor& w2, tensor& y2) override;
  void linear_swiglu(const tensor& x, const tensor& w, tensor& act) override;
  void gather_rows(const tensor& table, const tensor& ids, tensor& out) override;
  /// Decode's few rows with everything on the device: one kernel (cuda::ngram_embed). Tables in
  /// host memory: every table's rows gathered on the host and sent in one copy (then the
  /// projections on the device). Otherwise the default composition.
  void ngram_embed(const tensor& base, const tensor& tokens, const tensor& ngram_ids, std::span<const tensor> tables,
                   std::span<const tensor> projections, tensor& out) override;
  /// With the device N-gram cache of this backend and shapes the fused kernel takes: the hash,
  /// the gathers, the projections, the base row and the scale in one kernel.
  void ngram_embed_next(device_ngram& cache, const tensor& next, const tensor& base, const tensor& tokens, tensor& ngram_ids,
                        std::span<const tensor> tables, std::span<const tensor> projections, tensor& out) override;
  void scatter_add_rows(const tensor& x, const tensor& rows, const tensor& weights, tensor& out) override;
  void write_latents(tensor& kv, const latent_norm& norm, const rope_table& rope, const paged_latents& where) override;
  void mla_attention(const tensor& q, const tensor& kv_b, const paged_latents& cache, const mla_dims& dims,
                     const rope_table& rope, float softmax_scale, tensor& out) override;
  void router_topk(const tensor& logits, const tensor& bias, int k, float scaling, tensor& idx,
                   tensor& weights) override;
  /// One block per draw: radix selection for top-k and top-p, no sort (sample_kernel.cu).
  void sample(const tensor& logits, std::span<const token_draw> draws, tensor& tokens) override;
  /// One block per row (sample_kernel.cu).
  void argmax(const tensor& logits, tensor& ids) override;
  std::int64_t routed_moe_rows() const override;
  void routed_moe(const tensor& u, const moe_layer& moe, tensor& out, write_mode mode) override;

  std::unique_ptr<device_ngram> make_device_ngram(const model_config& config, int slots) override;

  /// While recording, `side` goes to a stream of its own that forks from the current one (with a
  /// cuBLAS handle and workspace of its own) and joins it again after `main`: the graph holds both
  /// branches. Branches nest (a branch's branch takes the next stream). Op by op the two run in
  /// turn on one stream (the host's dispatch is the cost there).
  void concurrently(const std::function<void()>& side, const std::function<void()>& main) override;
  /// Off: recordings too run both branches in turn on one stream (the same ops: the decode bench
  /// measures what the second stream gains). On by default.
  void set_concurrent_branches(bool on) { branches_ = on; }

  /// Records as a CUDA graph (stream capture); tensors allocated while capturing come from an
  /// arena the graph owns.
  bool records() const override { return true; }
  std::unique_ptr<backend> own_stream() const override { return std::make_unique<cuda_backend>(index_); }
  recording record(const std::function<tensor()>& body) override;

 private:
  struct arena;
  /// mla_attention's prefill (many rows per sequence): per sequence, keys and values decompressed
  /// from its latents by one GEMM, then flash-style causal attention of every head on tensor
  /// cores (bf16 operands, float32 sums; cuda::mla_flash_prefill).
  void mla_prefill(const tensor& q, const tensor& kv_b, const paged_latents& cache, const mla_dims& d,
                   const rope_table& rope, float softmax_scale, tensor& out);
  /// routed_moe's experts beyond gemv_max_rows rows: every routed expert's slots (grouped by
  /// moe_route: offsets, order) padded to u's row count, two batched bf16 GEMMs on tensor cores
  /// with SwiGLU between; y [rows * k, h] gets each slot's expert output.
  void routed_experts_on_tensor_cores(const tensor& u, const tensor& offsets, const tensor& order, std::int64_t k,
                                      const tensor& gate_up_ptrs, const tensor& down_ptrs, std::int64_t f, tensor& y);
  /// Throws when a host transfer is asked for while recording (a replay would repeat stale data).
  void expect_not_recording(const char* what) const;
  /// `t` on this device: itself, or an upload of a host tensor (index arguments).
  tensor on_device(const tensor& t);
  /// Copies `bytes` host bytes to `dst` on the stream without waiting for it: through pinned
  /// staging (a copy from pageable memory would first wait for the whole stream).
  void upload_async(void* dst, const void* src, std::size_t bytes);
  /// The one-kernel n-gram embedding where its shapes and placement allow (false: not taken);
  /// with `hash`, the ids are hashed in it from that cache (`next`: i32 tokens) into ngram_ids.
  bool fused_ngram_embed(const tensor& base, const tensor& tokens, const tensor& ngram_ids, std::span<const tensor> tables,
                         std::span<const tensor> projections, tensor& out, const ngram_cache_view* hash = nullptr,
                         const tensor* next = nullptr);
  /// `bytes` of pinned staging that no pending copy still reads; `fill` writes into it.
  std::byte* staging(std::size_t bytes);

  int index_;
  CUstream_st* stream_ = nullptr;
  cublasContext* blas_ = nullptr;
  // Pinned staging ring for small host-to-device copies: each copy takes the next free range
  // and records an event; a range is reused only after its event has passed.
  std::mutex staging_mutex_;
  std::byte* ring_ = nullptr;
  std::size_t ring_bytes_ = 0, ring_head_ = 0;
  struct pending_range {
    std::size_t begin, end;
    CUevent_st* done;
  };
  std::deque<pending_range> pending_;
  std::deque<CUevent_st*> spare_events_;
  void* blas_workspace_ = nullptr;  // cuBLAS must not allocate while a graph is captured
  // concurrently()'s side branches, one per nesting depth (a branch may hold branches of its
  // own): each a stream, cuBLAS handle and workspace (made on first use) and the events that
  // fork it and join it back; `open_branches_` of them are taken now.
  struct side_branch;
  std::vector<std::unique_ptr<side_branch>> sides_;
  std::size_t open_branches_ = 0;
  bool branches_ = true;
  std::shared_ptr<arena> recording_;  // set while a graph is captured
  // routed_moe's expert pointer tables, by the first expert's address, with the addresses they
  // hold (checked on each use): uploaded once, not every step.
  struct expert_table {
    std::vector<std::int64_t> addresses;
    tensor gate_up, down;
  };
  std::mutex expert_tables_mutex_;
  std::map<const void*, expert_table> expert_tables_;
};

}  // namespace troupe
