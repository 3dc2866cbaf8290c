#include "gpu/cuda/cuda_backend.hpp"

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstring>
#include <exception>
#include <map>
#include <mutex>
#include <stdexcept>

#include "gpu/cuda/cublas_check.hpp"
#include "gpu/cuda/cuda_check.hpp"
#include "gpu/cuda/cuda_kernels.hpp"
#include "gpu/cuda/ngram_cache.hpp"

namespace troupe {
namespace {

[[noreturn]] void fail_argument(const char* op, const std::string& what) {
  throw std::invalid_argument(std::string("cuda_backend::") + op + ": " + what);
}

#define TROUPE_EXPECT(ok, op, what)     \
  do {                                  \
    if (!(ok)) fail_argument(op, what); \
  } while (0)

bool on_gpu(const tensor& t) { return t.where().kind == device_kind::cuda; }

std::string shapes(const tensor& a, const tensor& b) {
  return shape_to_string(a.shape()) + " vs " + shape_to_string(b.shape());
}

cudaStream_t as_stream(CUstream_st* s) { return s; }

// One mutex for cuBLAS calls: actors of one process share the backend from several threads.
std::mutex& blas_mutex() {
  static std::mutex m;
  return m;
}

// A cuBLAS handle on `stream` with a workspace of its own (cuBLAS must not allocate while a
// graph is captured; two streams must not share one). No TF32: float32 GEMMs stay float32.
cublasHandle_t make_blas(cudaStream_t stream, void** workspace) {
  cublasHandle_t h;
  TROUPE_CUBLAS_CHECK(cublasCreate(&h));
  TROUPE_CUBLAS_CHECK(cublasSetStream(h, stream));
  TROUPE_CUBLAS_CHECK(cublasSetMathMode(h, CUBLAS_DEFAULT_MATH));
  const std::size_t bytes = std::size_t(32) << 20;  // Hopper's recommended size
  TROUPE_CUDA_CHECK(cudaMalloc(workspace, bytes));
  TROUPE_CUBLAS_CHECK(cublasSetWorkspace(h, *workspace, bytes));
  return h;
}

}  // namespace

struct cuda_backend::side_branch {
  cudaStream_t stream = nullptr;
  cublasHandle_t blas = nullptr;
  void* workspace = nullptr;
  cudaEvent_t fork = nullptr, join = nullptr;

  side_branch() {
    TROUPE_CUDA_CHECK(cudaStreamCreate(&stream));
    blas = make_blas(stream, &workspace);
    TROUPE_CUDA_CHECK(cudaEventCreateWithFlags(&fork, cudaEventDisableTiming));
    TROUPE_CUDA_CHECK(cudaEventCreateWithFlags(&join, cudaEventDisableTiming));
  }
  ~side_branch() {
    cudaStreamSynchronize(stream);
    cudaEventDestroy(fork);
    cudaEventDestroy(join);
    cublasDestroy(blas);
    cudaFree(workspace);
    cudaStreamDestroy(stream);
  }
};

// Device memory of one recording: chunks claimed while capturing, handed out in order and freed
// with the last tensor or graph that holds them.
struct cuda_backend::arena {
  static constexpr std::size_t chunk_bytes = std::size_t(32) << 20;
  std::vector<void*> chunks;
  std::size_t used = 0, capacity = 0;  // of the last chunk

  void* allocate(std::size_t bytes) {
    bytes = (bytes + 255) & ~std::size_t(255);
    if (chunks.empty() || used + bytes > capacity) {
      capacity = std::max(bytes, chunk_bytes);
      void* p = nullptr;
      TROUPE_CUDA_CHECK(cudaMalloc(&p, capacity));  // allowed in a relaxed capture; not recorded
      chunks.push_back(p);
      used = 0;
    }
    void* p = static_cast<std::byte*>(chunks.back()) + used;
    used += bytes;
    return p;
  }
  ~arena() {
    for (void* p : chunks) cudaFree(p);
  }
};

namespace {

class cuda_graph final : public recorded_ops {
 public:
  cuda_graph(cudaGraphExec_t exec, cudaStream_t stream, std::shared_ptr<void> memory)
      : exec_(exec), stream_(stream), memory_(std::move(memory)) {}
  ~cuda_graph() override { cudaGraphExecDestroy(exec_); }
  void replay() override { TROUPE_CUDA_CHECK(cudaGraphLaunch(exec_, stream_)); }

 private:
  cudaGraphExec_t exec_;
  cudaStream_t stream_;
  std::shared_ptr<void> memory_;
};

}  // namespace

namespace {

// backend::device_ngram over the device N-gram cache, slot i hashing row i of each call.
class cuda_device_ngram final : public device_ngram {
 public:
  cuda_device_ngram(const model_config& config, int slots, cudaStream_t stream, tensor slot_ids)
      : cache_(config, slots), stream_(stream), slot_ids_(std::move(slot_ids)) {}

  void set(int slot, std::span<const std::int32_t> tail) override { cache_.set(slot, tail.data(), tail.size(), stream_); }
  const device_ngram_cache& cache() const { return cache_; }

  void hash_next(const tensor& tokens, tensor& ids) override {
    const auto count = tokens.numel();
    TROUPE_EXPECT(on_gpu(tokens) && on_gpu(ids) && tokens.type() == dtype::i32 && ids.type() == dtype::i64 &&
                      count <= slot_ids_.numel() && ids.numel() == count * cache_.num_tables(),
                  "device_ngram::hash_next", "tokens " + shape_to_string(tokens.shape()) + ", ids " + shape_to_string(ids.shape()));
    cache_.hash_decode_async(tokens.data<std::int32_t>(), slot_ids_.data<std::int32_t>(), static_cast<int>(count),
                             ids.data<std::int64_t>(), stream_, true);
  }

 private:
  device_ngram_cache cache_;
  cudaStream_t stream_;
  tensor slot_ids_;  // 0, 1, ... on the device
};

}  // namespace

std::unique_ptr<device_ngram> cuda_backend::make_device_ngram(const model_config& config, int slots) {
  tensor ids = tensor::empty({slots}, dtype::i32);
  for (int i = 0; i < slots; ++i) ids.data<std::int32_t>()[i] = i;
  return std::make_unique<cuda_device_ngram>(config, slots, as_stream(stream_), upload(ids, dtype::i32));
}

bool cuda_backend::available() { return device_count() > 0; }

int cuda_backend::device_count() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

cuda_backend::cuda_backend(int index) : index_(index) {
  if (!available()) throw std::runtime_error("cuda_backend: no CUDA device is visible");
  TROUPE_CUDA_CHECK(cudaSetDevice(index_));
  cudaStream_t s;
  TROUPE_CUDA_CHECK(cudaStreamCreate(&s));
  stream_ = s;
  blas_ = make_blas(s, &blas_workspace_);
  // Keep freed memory in the stream-ordered pool (the default returns it to the driver at every
  // synchronisation, and each step would allocate it again).
  cudaMemPool_t pool;
  TROUPE_CUDA_CHECK(cudaDeviceGetDefaultMemPool(&pool, index_));
  std::uint64_t keep = UINT64_MAX;
  TROUPE_CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep));
  ring_bytes_ = std::size_t(64) << 20;
  void* ring = nullptr;
  TROUPE_CUDA_CHECK(cudaMallocHost(&ring, ring_bytes_));
  ring_ = static_cast<std::byte*>(ring);
}

cuda_backend::~cuda_backend() {
  sides_.clear();
  cudaStreamSynchronize(as_stream(stream_));
  for (auto& p : pending_) cudaEventDestroy(p.done);
  for (auto* e : spare_events_) cudaEventDestroy(e);
  cudaFreeHost(ring_);
  cublasDestroy(blas_);
  cudaFree(blas_workspace_);
  cudaStreamDestroy(as_stream(stream_));
}

void cuda_backend::expect_not_recording(const char* what) const {
  if (recording_)
    throw std::logic_error(std::string("cuda_backend: ") + what +
                           " while recording a graph (a replay would repeat this step's data)");
}

backend::recording cuda_backend::record(const std::function<tensor()>& body) {
  body();  // warm-up: kernels loaded, cuBLAS ready, expert tables uploaded; its result is dropped here
  synchronize();
  auto memory = std::make_shared<arena>();
  recording_ = memory;
  TROUPE_CUDA_CHECK(cudaStreamBeginCapture(as_stream(stream_), cudaStreamCaptureModeRelaxed));
  tensor out;
  cudaGraph_t graph = nullptr;
  try {
    out = body();
  } catch (...) {
    cudaStreamEndCapture(as_stream(stream_), &graph);
    if (graph) cudaGraphDestroy(graph);
    recording_.reset();
    throw;
  }
  recording_.reset();
  TROUPE_CUDA_CHECK(cudaStreamEndCapture(as_stream(stream_), &graph));
  cudaGraphExec_t exec = nullptr;
  const cudaError_t made = cudaGraphInstantiate(&exec, graph, 0);
  cudaGraphDestroy(graph);
  TROUPE_CUDA_CHECK(made);
  return {std::make_unique<cuda_graph>(exec, as_stream(stream_), memory), out};
}

void cuda_backend::concurrently(const std::function<void()>& side, const std::function<void()>& main) {
  if (!recording_ || !branches_) return backend::concurrently(side, main);
  if (sides_.size() == open_branches_) sides_.push_back(std::make_unique<side_branch>());
  side_branch& branch = *sides_[open_branches_++];
  struct release {
    std::size_t& open;
    ~release() { --open; }
  } taken{open_branches_};
  // The side branch is enqueued with stream_ and blas_ pointing at its stream and handle, so
  // every op reaches it unchanged; nothing else uses the backend while a graph is captured.
  TROUPE_CUDA_CHECK(cudaEventRecord(branch.fork, as_stream(stream_)));
  TROUPE_CUDA_CHECK(cudaStreamWaitEvent(branch.stream, branch.fork, 0));
  CUstream_st* const own_stream = stream_;
  cublasContext* const own_blas = blas_;
  stream_ = branch.stream, blas_ = branch.blas;
  std::exception_ptr failed;
  try {
    side();
  } catch (...) {
    failed = std::current_exception();
  }
  stream_ = own_stream, blas_ = own_blas;
  TROUPE_CUDA_CHECK(cudaEventRecord(branch.join, branch.stream));
  if (!failed) try {
      main();
    } catch (...) {
      failed = std::current_exception();
    }
  // Joined even when a branch threw: the capture then ends whole and record() reports the error.
  TROUPE_CUDA_CHECK(cudaStreamWaitEvent(as_stream(stream_), branch.join, 0));
  if (failed) std::rethrow_exception(failed);
}

std::byte* cuda_backend::staging(std::size_t bytes) {
  // Called with staging_mutex_ held. Ranges are taken in ring order; the oldest pending
  // ranges are retired (waiting for their copies if they overlap the range wanted).
  bytes = (bytes + 255) & ~std::size_t(255);
  if (ring_head_ + bytes > ring_bytes_) ring_head_ = 0;
  const std::size_t begin = ring_head_, end = begin + bytes;
  while (!pending_.empty()) {
    auto& p = pending_.front();
    const bool overlaps = p.begin < end && begin < p.end;
    if (!overlaps && cudaEventQuery(p.done) != cudaSuccess) break;
    if (overlaps) TROUPE_CUDA_CHECK(cudaEventSynchronize(p.done));
    spare_events_.push_back(p.done);
    pending_.pop_front();
  }
  for (const auto& p : pending_)  // a younger range can still overlap after a wrap
    if (p.begin < end && begin < p.end) TROUPE_CUDA_CHECK(cudaEventSynchronize(p.done));
  ring_head_ = end;
  return ring_ + begin;
}

void cuda_backend::upload_async(void* dst, const void* src, std::size_t bytes) {
  if (bytes == 0) return;
  expect_not_recording("a host-to-device copy");
  if (bytes > ring_bytes_ / 4) {  // large (weights at load): a plain copy
    TROUPE_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, as_stream(stream_)));
    return;
  }
  std::lock_guard lock(staging_mutex_);
  std::byte* stage = staging(bytes);
  std::memcpy(stage, src, bytes);
  TROUPE_CUDA_CHECK(cudaMemcpyAsync(dst, stage, bytes, cudaMemcpyHostToDevice, as_stream(stream_)));
  cudaEvent_t done;
  if (spare_events_.empty()) {
    TROUPE_CUDA_CHECK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
  } else {
    done = spare_events_.back();
    spare_events_.pop_back();
  }
  TROUPE_CUDA_CHECK(cudaEventRecord(done, as_stream(stream_)));
  pending_.push_back({static_cast<std::size_t>(stage - ring_), static_cast<std::size_t>(stage - ring_) + bytes, done});
}

std::string cuda_backend::name() const {
  cudaDeviceProp p{};
  if (cudaGetDeviceProperties(&p, index_) != cudaSuccess) return "cuda";
  return std::string("cuda:") + std::to_string(index_) + " (" + p.name + ")";
}

tensor cuda_backend::empty(shape_t shape, dtype type) {
  std::int64_t n = 1;
  for (auto d : shape) n *= d;
  const std::size_t bytes = std::max<std::size_t>(1, static_cast<std::size_t>(n) * dtype_size(type));
  if (recording_) {  // the graph keeps this address: the arena holds it as long as graph or tensor lives
    void* p = recording_->allocate(bytes);
    return tensor::view(std::shared_ptr<void>(recording_, p), p, std::move(shape), type, where());
  }
  void* p = nullptr;
  TROUPE_CUDA_CHECK(cudaMallocAsync(&p, bytes, as_stream(stream_)));
  // Freed on the legacy default stream: ordered after this backend's (blocking) stream, and
  // valid even when the tensor outlives the backend object.
  std::shared_ptr<void> owner(p, [](void* q) { cudaFreeAsync(q, nullptr); });
  return tensor::view(std::move(owner), p, std::move(shape), type, where());
}

tensor cuda_backend::upload(const tensor& host, dtype type) {
  TROUPE_EXPECT(!on_gpu(host), "upload", "the tensor is already on a GPU");
  tensor src = host;
  if (host.type() != type) {
    tensor f = host.to_f32();
    if (type == dtype::f32) {
      src = f;
    } else {
      src = tensor::empty(host.shape(), type);
      convert_from_f32(type, f.data<float>(), src.raw(), static_cast<std::size_t>(f.numel()));
    }
  }
  tensor out = empty(src.shape(), type);
  upload_async(out.raw(), src.raw(), src.nbytes());  // `src` may go once this returns
  return out;
}

tensor cuda_backend::download(const tensor& t) {
  if (!on_gpu(t)) return t;
  expect_not_recording("a device-to-host copy");
  tensor out = tensor::empty(t.shape(), t.type());
  TROUPE_CUDA_CHECK(cudaMemcpyAsync(out.raw(), t.raw(), t.nbytes(), cudaMemcpyDeviceToHost, as_stream(stream_)));
  synchronize();
  return out;
}

tensor cuda_backend::on_device(const tensor& t) { return on_gpu(t) ? t : upload(t, t.type()); }

void cuda_backend::copy_rows(const tensor& src, tensor& dst, std::int64_t dst_row) {
  TROUPE_EXPECT(src.type() == dst.type() && src.rank() == 2 && dst.rank() == 2 && src.dim(1) == dst.dim(1), "copy_rows",
                shapes(src, dst));
  TROUPE_EXPECT(dst_row >= 0 && dst_row + src.dim(0) <= dst.dim(0), "copy_rows", "rows out of range");
  const std::size_t row_bytes = static_cast<std::size_t>(dst.dim(1)) * dtype_size(dst.type());
  void* to = static_cast<std::byte*>(dst.raw()) + dst_row * row_bytes;
  if (on_gpu(src))
    TROUPE_CUDA_CHECK(cudaMemcpyAsync(to, src.raw(), src.nbytes(), cudaMemcpyDeviceToDevice, as_stream(stream_)));
  else
    upload_async(to, src.raw(), src.nbytes());
}

void cuda_backend::synchronize() {
  expect_not_recording("a synchronisation");
  TROUPE_CUDA_CHECK(cudaStreamSynchronize(as_stream(stream_)));
}

void cuda_backend::linear(const tensor& x, const tensor& w, tensor& y, write_mode mode) {
  TROUPE_EXPECT(x.rank() == 2 && w.rank() == 2 && y.rank() == 2, "linear", "rank-2 tensors expected");
  const auto m = x.dim(0), k = x.dim(1), n = w.dim(0);
  TROUPE_EXPECT(w.dim(1) == k && y.dim(0) == m && y.dim(1) == n, "linear",
                "x " + shape_to_string(x.shape()) + ", w " + shape_to_string(w.shape()) + ", y " + shape_to_string(y.shape()));
  TROUPE_EXPECT(on_gpu(x) && on_gpu(w) && on_gpu(y), "linear", "operands must be on the GPU");
  if (m == 0) return;
  TROUPE_EXPECT(w.type() == dtype::bf16 || w.type() == dtype::f32, "linear", "weights must be bf16 or f32");
  if (m <= cuda::gemv_max_rows) {  // decode: one launch, float32 activations
    cuda::gemv(x.data<float>(), m, k, w.type(), w.raw(), n, y.data<float>(), mode == write_mode::accumulate,
               as_stream(stream_));
    return;
  }
  const float alpha = 1.0f, beta = mode == write_mode::accumulate ? 1.0f : 0.0f;
  // Row-major y[M,N] = x[M,K] w[N,K]^T is column-major y^T[N,M] = w^T(N x K) x^T(K x M).
  std::lock_guard lock(blas_mutex());
  if (w.type() == dtype::f32) {  // the router: float32 throughout
    TROUPE_CUBLAS_CHECK(cublasSgemm(blas_, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n), static_cast<int>(m),
                                    static_cast<int>(k), &alpha, w.data<float>(), static_cast<int>(k), x.data<float>(),
                                    static_cast<int>(k), &beta, y.data<float>(), static_cast<int>(n)));
    return;
  }
  tensor xb = empty({m, k}, dtype::bf16);  // activations rounded to bf16: bf16 x bf16 products, float32 sums
  cuda::f32_to_bf16(x.data<float>(), static_cast<std::uint16_t*>(xb.raw()), m * k, as_stream(stream_));
  TROUPE_CUBLAS_CHECK(cublasGemmEx(blas_, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n), static_cast<int>(m),
                                   static_cast<int>(k), &alpha, w.raw(), CUDA_R_16BF, static_cast<int>(k), xb.raw(),
                                   CUDA_R_16BF, static_cast<int>(k), &beta, y.raw(), CUDA_R_32F, static_cast<int>(n),
                                   CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

void cuda_backend::rms_norm(const tensor& x, const tensor& w, float eps, tensor& y) {
  const auto rows = x.dim(0), cols = x.dim(1);
  TROUPE_EXPECT(w.numel() == cols && y.shape() == x.shape(), "rms_norm", shapes(x, y));
  cuda::rms_norm(x.data<float>(), cols, w.data<float>(), y.data<float>(), cols, rows, cols, eps, 1.0f, as_stream(stream_));
}

void cuda_backend::add_rms_norm(tensor& y, const tensor& x, const tensor& w, float eps, tensor& normed) {
  const auto rows = y.dim(0), cols = y.dim(1);
  TROUPE_EXPECT(x.shape() == y.shape() && normed.shape() == y.shape() && w.numel() == cols, "add_rms_norm", shapes(y, x));
  cuda::add_rms_norm(y.data<float>(), x.data<float>(), w.data<float>(), normed.data<float>(), rows, cols, eps,
                     as_stream(stream_));
}

void cuda_backend::layer_norm(const tensor& x, float eps, tensor& y) {
  TROUPE_EXPECT(y.shape() == x.shape(), "layer_norm", shapes(x, y));
  cuda::layer_norm(x.data<float>(), y.data<float>(), x.dim(0), x.dim(1), eps, as_stream(stream_));
}

void cuda_backend::zero(tensor& y) { TROUPE_CUDA_CHECK(cudaMemsetAsync(y.raw(), 0, y.nbytes(), as_stream(stream_))); }

void cuda_backend::scale(tensor& y, float s) { cuda::scale(y.data<float>(), y.numel(), s, as_stream(stream_)); }

void cuda_backend::add(tensor& y, const tensor& x) {
  TROUPE_EXPECT(y.numel() == x.numel(), "add", shapes(y, x));
  cuda::add(y.data<float>(), x.data<float>(), y.numel(), as_stream(stream_));
}

void cuda_backend::swiglu(const tensor& gate_up, tensor& out) {
  const auto rows = gate_up.dim(0), f = out.dim(1);
  TROUPE_EXPECT(gate_up.dim(1) == 2 * f && out.dim(0) == rows, "swiglu", shapes(gate_up, out));
  cuda::swiglu(gate_up.data<float>(), out.data<float>(), rows, f, as_stream(stream_));
}

void cuda_backend::linear_pair(const tensor& x, const tensor& w1, tensor& y1, const tensor& w2, tensor& y2) {
  const auto m = x.dim(0);
  TROUPE_EXPECT(x.rank() == 2 && w1.rank() == 2 && w2.rank() == 2 && w1.dim(1) == x.dim(1) && w2.dim(1) == x.dim(1) &&
                    y1.dim(0) == m && y1.dim(1) == w1.dim(0) && y2.dim(0) == m && y2.dim(1) == w2.dim(0),
                "linear_pair", "x " + shape_to_string(x.shape()) + ", w1 " + shape_to_string(w1.shape()) + ", w2 " +
                                   shape_to_string(w2.shape()));
  if (m > cuda::gemv_max_rows || w1.type() != dtype::bf16 || w2.type() != dtype::bf16)
    return backend::linear_pair(x, w1, y1, w2, y2);
  TROUPE_EXPECT(on_gpu(x) && on_gpu(w1) && on_gpu(w2) && on_gpu(y1) && on_gpu(y2), "linear_pair", "operands must be on the GPU");
  cuda::gemv_pair_bf16(x.data<float>(), m, x.dim(1), static_cast<const std::uint16_t*>(w1.raw()), w1.dim(0), y1.data<float>(),
                       static_cast<const std::uint16_t*>(w2.raw()), w2.dim(0), y2.data<float>(), as_stream(stream_));
}

void cuda_backend::linear_swiglu(const tensor& x, const tensor& w, tensor& act) {
  const auto m = x.dim(0), f = act.dim(1);
  TROUPE_EXPECT(x.rank() == 2 && w.rank() == 2 && w.dim(0) == 2 * f && w.dim(1) == x.dim(1) && act.dim(0) == m,
                "linear_swiglu", "x " + shape_to_string(x.shape()) + ", w " + shape_to_string(w.shape()) + ", act " +
                                     shape_to_string(act.shape()));
  if (m > cuda::gemv_max_rows || w.type() != dtype::bf16) return backend::linear_swiglu(x, w, act);  // cuBLAS, then SwiGLU
  TROUPE_EXPECT(on_gpu(x) && on_gpu(w) && on_gpu(act), "linear_swiglu", "operands must be on the GPU");
  cuda::gemv_swiglu_bf16(x.data<float>(), m, x.dim(1), static_cast<const std::uint16_t*>(w.raw()), f, act.data<float>(),
                         as_stream(stream_));
}

namespace {

// Rows ids[0 .. n) of a table in host memory (memory-mapped, any float dtype) as float32 into
// dst [n, cols]: the host side of a host-table gather, whose rows alone then cross the bus.
void gather_host_rows(const tensor& table, const std::int64_t* ids, std::int64_t n, float* dst, const char* op) {
  const auto cols = table.dim(1), rows = table.dim(0);
  const auto row_bytes = static_cast<std::size_t>(cols) * dtype_size(table.type());
  for (std::int64_t r = 0; r < n; ++r) {
    TROUPE_EXPECT(ids[r] >= 0 && ids[r] < rows, op,
                  "row id " + std::to_string(ids[r]) + " outside a table of " + std::to_string(rows) + " rows");
    convert_to_f32(table.type(), static_cast<const std::byte*>(table.raw()) + ids[r] * row_bytes, dst + r * cols,
                   static_cast<std::size_t>(cols));
  }
}

}  // namespace

void cuda_backend::gather_rows(const tensor& table, const tensor& ids, tensor& out) {
  const auto n = ids.numel(), cols = table.dim(1);
  TROUPE_EXPECT(out.dim(0) == n && out.dim(1) == cols && ids.type() == dtype::i64, "gather_rows", shapes(table, out));
  if (!on_gpu(table)) {
    TROUPE_EXPECT(!on_gpu(ids), "gather_rows", "a host table needs host ids");
    tensor rows = tensor::empty({n, cols}, dtype::f32);
    gather_host_rows(table, ids.data<std::int64_t>(), n, rows.data<float>(), "gather_rows");
    upload_async(out.raw(), rows.raw(), rows.nbytes());
    return;
  }
  if (!on_gpu(ids))
    for (std::int64_t r = 0; r < n; ++r)
      TROUPE_EXPECT(ids.data<std::int64_t>()[r] >= 0 && ids.data<std::int64_t>()[r] < table.dim(0), "gather_rows",
                    "row id " + std::to_string(ids.data<std::int64_t>()[r]) + " outside a table of " +
                        std::to_string(table.dim(0)) + " rows");
  const tensor d_ids = on_device(ids);
  cuda::gather_rows(table.type(), table.raw(), cols, d_ids.data<std::int64_t>(), out.data<float>(), n, as_stream(stream_));
}

void cuda_backend::ngram_embed_next(device_ngram& cache, const tensor& next, const tensor& base, const tensor& tokens,
                                    tensor& ngram_ids, std::span<const tensor> tables, std::span<const tensor> projections,
                                    tensor& out) {
  const auto* ours = dynamic_cast<const cuda_device_ngram*>(&cache);
  const auto t = next.numel();
  if (ours && t <= ours->cache().max_sequences() && ours->cache().num_tables() == static_cast<int>(tables.size())) {
    TROUPE_EXPECT(on_gpu(next) && next.type() == dtype::i32 && on_gpu(ngram_ids) && ngram_ids.type() == dtype::i64 &&
                      ngram_ids.numel() == t * static_cast<std::int64_t>(tables.size()) && tokens.numel() == t,
                  "ngram_embed_next", "next " + shape_to_string(next.shape()) + ", ids " + shape_to_string(ngram_ids.shape()));
    const ngram_cache_view view = ours->cache().view();
    if (fused_ngram_embed(base, tokens, ngram_ids, tables, projections, out, &view, &next)) return;
  }
  backend::ngram_embed_next(cache, next, base, tokens, ngram_ids, tables, projections, out);
}

bool cuda_backend::fused_ngram_embed(const tensor& base, const tensor& tokens, const tensor& ngram_ids,
                                     std::span<const tensor> tables, std::span<const tensor> projections, tensor& out,
                                     const ngram_cache_view* hash, const tensor* next) {
  const auto t = tokens.numel();
  const auto e = static_cast<int>(tables.size());
  if (e == 0 || !cuda::ngram_embed_fits(t, e, tables[0].dim(1)) || !on_gpu(base)) return false;
  cuda::ngram_embed_args a{};
  a.num_tables = e;
  a.d = tables[0].dim(1);
  a.h = out.dim(1);
  a.table_type = tables[0].type();
  for (int i = 0; i < e; ++i) {
    const auto& table = tables[static_cast<std::size_t>(i)];
    const auto& proj = projections[static_cast<std::size_t>(i)];
    if (!on_gpu(table) || table.type() != a.table_type || table.dim(1) != a.d || !on_gpu(proj) || proj.type() != dtype::bf16 ||
        proj.dim(0) != a.h || proj.dim(1) != a.d)
      return false;
    a.tables[i] = table.raw();
    a.projections[i] = proj.raw();
  }
  TROUPE_EXPECT(base.dim(1) == a.h && out.dim(0) == t, "ngram_embed", shapes(base, out));
  // Host ids (a step dispatched op by op) go up first, so recorded and op-by-op steps compute
  // the embedding the same way.
  const tensor d_tokens = on_device(tokens), d_ids = on_device(ngram_ids);
  a.base_type = base.type();
  a.base = base.raw();
  a.tokens = d_tokens.data<std::int64_t>();
  a.ids = d_ids.data<std::int64_t>();  // written only when hashing: then it is ngram_ids itself
  a.scale = 1.0f / static_cast<float>(1 + e);
  if (hash) {
    a.hash = *hash;
    a.tokens32 = next->data<std::int32_t>();
  }
  cuda::ngram_embed(a, t, out.data<float>(), as_stream(stream_));
  return true;
}

void cuda_backend::ngram_embed(const tensor& base, const tensor& tokens, const tensor& ngram_ids,
                               std::span<const tensor> tables, std::span<const tensor> projections, tensor& out) {
  check_ngram_embed_args(tokens, ngram_ids, tables.size());
  const auto on_device = [](const tensor& x) { return on_gpu(x); };
  if (fused_ngram_embed(base, tokens, ngram_ids, tables, projections, out)) return;
  const bool host_tables = !tables.empty() && !on_gpu(ngram_ids) && std::none_of(tables.begin(), tables.end(), on_device);
  if (!host_tables) return backend::ngram_embed(base, tokens, ngram_ids, tables, projections, out);
  // Each upload is a host call, a staging copy and a DMA of its own: the rows of all tables go
  // as one ([E, T, d_i] back to back), and decode's embedding makes two uploads instead of E + 1.
  const auto t = tokens.numel();
  std::int64_t total = 0;
  for (const auto& table : tables) total += t * table.dim(1);
  tensor rows = tensor::empty({total}, dtype::f32);
  std::int64_t offset = 0;
  for (std::size_t i = 0; i < tables.size(); ++i) {
    gather_host_rows(tables[i], ngram_ids.data<std::int64_t>() + static_cast<std::int64_t>(i) * t, t,
                     rows.data<float>() + offset, "ngram_embed");
    offset += t * tables[i].dim(1);
  }
  gather_rows(base, tokens, out);
  const tensor d_rows = upload(rows, dtype::f32);
  offset = 0;
  for (std::size_t i = 0; i < tables.size(); ++i) {
    const auto cols = tables[i].dim(1);
    const tensor table_rows = d_rows.rows(offset, offset + t * cols).reshape({t, cols});
    linear(table_rows, projections[i], out, write_mode::accumulate);
    offset += t * cols;
  }
  scale(out, 1.0f / static_cast<float>(1 + tables.size()));
}

void cuda_backend::scatter_add_rows(const tensor& x, const tensor& rows, const tensor& weights, tensor& out) {
  const auto n = x.dim(0), cols = x.dim(1);
  TROUPE_EXPECT(rows.numel() == n && weights.numel() == n && out.dim(1) == cols, "scatter_add_rows", shapes(x, out));
  const tensor d_rows = on_device(rows), d_weights = on_device(weights);
  cuda::scatter_add_rows(x.data<float>(), d_rows.data<std::int32_t>(), d_weights.data<float>(), out.data<float>(), n, cols,
                         as_stream(stream_));
}

namespace {

cuda::paged_args paged(const paged_latents& c, std::int64_t rows, std::int64_t width) {
  TROUPE_EXPECT(c.block_table.rank() == 2 && c.block_table.type() == dtype::i64 && c.row_seq.numel() == rows &&
                    c.positions.numel() == rows && c.block_tokens > 0 && on_gpu(c.block_table) && on_gpu(c.row_seq) &&
                    on_gpu(c.positions),
                "paged_latents", "a block table " + shape_to_string(c.block_table.shape()) + " for " + std::to_string(rows) +
                                     " rows (all on the GPU)");
  return {c.block_table.data<std::int64_t>(), c.block_table.dim(1), c.row_seq.data<std::int32_t>(),
          c.positions.data<std::int64_t>(), c.block_tokens, width};
}

}  // namespace

namespace {

const float* rope_freqs(const rope_table& rope) {
  TROUPE_EXPECT(on_gpu(rope.inv_freq) && rope.inv_freq.type() == dtype::f32, "rope", "inv_freq must be f32 on the GPU");
  return rope.inv_freq.data<float>();
}

}  // namespace

void cuda_backend::write_latents(tensor& kv, const latent_norm& norm, const rope_table& rope, const paged_latents& where) {
  const auto cols = norm.weight.numel();
  TROUPE_EXPECT(cols + 2 * rope.inv_freq.numel() == kv.dim(1) && on_gpu(norm.weight), "write_latents",
                "kv " + shape_to_string(kv.shape()) + " for a latent norm of " + std::to_string(cols) + " columns");
  const cuda::latent_args l{norm.weight.data<float>(), cols, norm.eps, norm.post_scale, rope_freqs(rope), rope.attention_factor};
  cuda::write_latents(kv.data<float>(), kv.dim(0), l, paged(where, kv.dim(0), kv.dim(1)), as_stream(stream_));
}

void cuda_backend::mla_attention(const tensor& q, const tensor& kv_b, const paged_latents& cache, const mla_dims& d,
                                 const rope_table& rope, float softmax_scale, tensor& out) {
  const std::int64_t qk = d.nope_dim + d.rope_dim, rows = q.dim(0);
  TROUPE_EXPECT(q.dim(1) == d.num_heads * qk && out.dim(1) == d.num_heads * d.v_dim && out.dim(0) == rows,
                "mla_attention", "q " + shape_to_string(q.shape()) + ", out " + shape_to_string(out.shape()));
  TROUPE_EXPECT(kv_b.dim(0) == d.num_heads * (d.nope_dim + d.v_dim) && kv_b.dim(1) == d.kv_lora_rank &&
                    (kv_b.type() == dtype::f32 || kv_b.type() == dtype::bf16),
                "mla_attention", "kv_b " + shape_to_string(kv_b.shape()) + " (bf16 or f32)");
  TROUPE_EXPECT(cache.max_keys > 0 && cache.max_keys <= cache.block_table.dim(1) * cache.block_tokens, "mla_attention",
                std::to_string(cache.max_keys) + " keys in " + std::to_string(cache.block_table.dim(1)) + " blocks");
  if (rows == 0) return;
  TROUPE_EXPECT(2 * rope.inv_freq.numel() == d.rope_dim, "mla_attention", "RoPE for " + std::to_string(d.rope_dim) + " columns");
  if (cache.rows_per_sequence >= cuda::mla_prefill_min_rows) return mla_prefill(q, kv_b, cache, d, rope, softmax_scale, out);
  cuda::mla_args a{q.data<float>(), kv_b.raw(), kv_b.type(), rope_freqs(rope), rope.attention_factor,
                   paged(cache, rows, d.kv_lora_rank + d.rope_dim), rows, d.num_heads, d.nope_dim, d.rope_dim, d.v_dim,
                   d.kv_lora_rank, softmax_scale, out.data<float>()};
  cuda::mla_attention(a, as_stream(stream_));
}

void cuda_backend::mla_prefill(const tensor& q, const tensor& kv_b, const paged_latents& cache, const mla_dims& d,
                               const rope_table& rope, float softmax_scale, tensor& out) {
  const std::int64_t rows = q.dim(0), heads = d.num_heads;
  const tensor row_seq = cache.host_row_seq.defined() ? cache.host_row_seq : download(cache.row_seq);
  const tensor positions = cache.host_positions.defined() ? cache.host_positions : download(cache.positions);
  std::map<std::int32_t, std::vector<std::int32_t>> seq_rows;  // each sequence's rows, in step order
  std::map<std::int32_t, std::int64_t> seq_keys;                // and how many of its latents they see
  for (std::int64_t r = 0; r < rows; ++r) {
    const std::int32_t seq = row_seq.data<std::int32_t>()[r];
    const std::int64_t pos = positions.data<std::int64_t>()[r];
    TROUPE_EXPECT(seq >= 0 && seq < cache.block_table.dim(0) && pos >= 0 && pos < cache.max_keys, "mla_attention",
                  "row " + std::to_string(r) + ": sequence " + std::to_string(seq) + " at position " + std::to_string(pos));
    seq_rows[seq].push_back(static_cast<std::int32_t>(r));
    seq_keys[seq] = std::max(seq_keys[seq], pos + 1);
  }
  const cuda::paged_args pages = paged(cache, rows, d.kv_lora_rank + d.rope_dim);
  cudaStream_t s = as_stream(stream_);
  for (const auto& [seq, ids] : seq_rows) {  // every row is in one sequence: out is written whole
    const auto p = cuda::prefill_shape(heads, d.nope_dim, d.rope_dim, d.v_dim, static_cast<std::int64_t>(ids.size()), seq_keys[seq]);
    // Keys and values of every head from the sequence's latents: one GEMM against kv_b.
    tensor lat = empty({p.keys, d.kv_lora_rank}, dtype::f32);
    cuda::mla_prefill_gather(pages, seq, p.keys, d.kv_lora_rank, lat.data<float>(), s);
    tensor kvd = empty({p.keys, kv_b.dim(0)}, dtype::f32);
    linear(lat, kv_b, kvd, write_mode::overwrite);
    tensor k = empty({heads, p.keys_pad, p.qk_pad}, dtype::bf16), vt = empty({heads, p.v_pad, p.keys_pad}, dtype::bf16);
    cuda::mla_prefill_keys(pages, seq, kvd.data<float>(), p, d.kv_lora_rank, static_cast<std::uint16_t*>(k.raw()),
                           static_cast<std::uint16_t*>(vt.raw()), s);
    tensor host_ids = tensor::empty({p.rows}, dtype::i32);
    std::copy(ids.begin(), ids.end(), host_ids.data<std::int32_t>());
    const tensor row_ids = upload(host_ids, dtype::i32);
    tensor qb = empty({heads, p.rows_pad, p.qk_pad}, dtype::bf16);
    cuda::mla_prefill_queries(q.data<float>(), cache.positions.data<std::int64_t>(), row_ids.data<std::int32_t>(), p,
                              rope_freqs(rope), rope.attention_factor, static_cast<std::uint16_t*>(qb.raw()), s);
    cuda::mla_flash_prefill(p, static_cast<const std::uint16_t*>(qb.raw()), static_cast<const std::uint16_t*>(k.raw()),
                            static_cast<const std::uint16_t*>(vt.raw()), cache.positions.data<std::int64_t>(),
                            row_ids.data<std::int32_t>(), softmax_scale, out.data<float>(), s);
  }
}

void cuda_backend::router_topk(const tensor& logits, const tensor& bias, int k, float scaling, tensor& idx,
                               tensor& weights) {
  const auto t = logits.dim(0), e = logits.dim(1);
  TROUPE_EXPECT(bias.numel() == e && k > 0 && k <= e && idx.dim(0) == t && idx.dim(1) == k && weights.dim(1) == k,
                "router_topk", "logits " + shape_to_string(logits.shape()) + ", k " + std::to_string(k));
  cuda::router_topk(logits.data<float>(), bias.data<float>(), t, e, k, scaling, idx.data<std::int32_t>(),
                    weights.data<float>(), as_stream(stream_));
}

void cuda_backend::sample(const tensor& logits, std::span<const token_draw> draws, tensor& tokens) {
  const auto n = static_cast<std::int64_t>(draws.size());
  TROUPE_EXPECT(logits.type() == dtype::f32 && logits.rank() == 2 && tokens.type() == dtype::i32 && tokens.numel() == n,
                "sample", "logits " + shape_to_string(logits.shape()) + ", tokens " + shape_to_string(tokens.shape()) + " for " +
                              std::to_string(n) + " draws");
  TROUPE_EXPECT(on_gpu(logits) && on_gpu(tokens), "sample", "logits and tokens must be on the GPU");
  if (n == 0) return;
  // The draws and their contexts go up in one copy: [sample_draw x n][context ids].
  std::vector<cuda::sample_draw> packed(static_cast<std::size_t>(n));
  std::vector<std::int32_t> context;
  bool penalised = false;
  for (std::size_t i = 0; i < packed.size(); ++i) {
    const token_draw& d = draws[i];
    TROUPE_EXPECT(d.row >= 0 && d.row < logits.dim(0), "sample", "row " + std::to_string(d.row) + " of " + shape_to_string(logits.shape()));
    auto& p = packed[i];
    p = {d.row, d.u, d.params.temperature, d.params.top_p, d.params.repetition_penalty, d.params.top_k, 0, 0};
    if (d.params.repetition_penalty != 1.0f) {
      penalised = true;
      p.context_begin = static_cast<std::int32_t>(context.size());
      context.insert(context.end(), d.context.begin(), d.context.end());
      p.context_end = static_cast<std::int32_t>(context.size());
    }
  }
  const std::size_t draw_bytes = packed.size() * sizeof(cuda::sample_draw);
  std::vector<std::byte> bytes(draw_bytes + context.size() * sizeof(std::int32_t));
  std::memcpy(bytes.data(), packed.data(), draw_bytes);
  std::memcpy(bytes.data() + draw_bytes, context.data(), context.size() * sizeof(std::int32_t));
  tensor args = empty({static_cast<std::int64_t>((bytes.size() + 7) / 8)}, dtype::i64);
  upload_async(args.raw(), bytes.data(), bytes.size());
  const auto* base = static_cast<const std::byte*>(args.raw());
  cuda::sample(logits.data<float>(), logits.dim(1), reinterpret_cast<const cuda::sample_draw*>(base), n,
               reinterpret_cast<const std::int32_t*>(base + draw_bytes), penalised, tokens.data<std::int32_t>(),
               as_stream(stream_));
}

void cuda_backend::argmax(const tensor& logits, tensor& ids) {
  const std::int64_t rows = logits.rank() == 2 ? logits.dim(0) : -1;
  TROUPE_EXPECT(logits.type() == dtype::f32 && ids.numel() == rows && (ids.type() == dtype::i32 || ids.type() == dtype::i64),
                "argmax", "logits " + shape_to_string(logits.shape()) + ", ids " + shape_to_string(ids.shape()) + " (i32 or i64)");
  TROUPE_EXPECT(on_gpu(logits) && on_gpu(ids), "argmax", "logits and ids must be on the GPU");
  const bool narrow = ids.type() == dtype::i32;
  cuda::argmax_rows(logits.data<float>(), rows, logits.dim(1), narrow ? ids.data<std::int32_t>() : nullptr,
                    narrow ? nullptr : ids.data<std::int64_t>(), as_stream(stream_));
}

std::int64_t cuda_backend::routed_moe_rows() const { return cuda::routed_moe_max_rows; }

void cuda_backend::routed_experts_on_tensor_cores(const tensor& u, const tensor& offsets, const tensor& order, std::int64_t k,
                                                  const tensor& gate_up_ptrs, const tensor& down_ptrs, std::int64_t f, tensor& y) {
  const std::int64_t cap = u.dim(0), h = u.dim(1), n_routed = gate_up_ptrs.numel();  // an expert has at most one slot a row
  cudaStream_t s = as_stream(stream_);
  tensor x = empty({n_routed * cap, h}, dtype::bf16), gate_up = empty({n_routed * cap, 2 * f}, dtype::f32);
  tensor act = empty({n_routed * cap, f}, dtype::bf16), rows = empty({n_routed * cap, h}, dtype::f32);
  tensor ptrs = empty({4 * n_routed}, dtype::i64);  // expert e's slice of x, gate_up, act, rows
  cuda::moe_dispatch(u.data<float>(), h, static_cast<int>(k), offsets.data<std::int32_t>(), order.data<std::int32_t>(),
                     static_cast<std::int32_t>(n_routed), cap, static_cast<std::uint16_t*>(x.raw()), s);
  const auto** p = static_cast<const void**>(ptrs.raw());
  cuda::moe_gemm_pointers(static_cast<std::int32_t>(n_routed), x.raw(), cap * h, gate_up.raw(), cap * 2 * f, act.raw(), cap * f,
                          rows.raw(), cap * h, p, s);
  const float one = 1.0f, zero_beta = 0.0f;
  {
    std::lock_guard lock(blas_mutex());
    // Row-major C_e[cap, 2f] = X_e[cap, h] W_e[2f, h]^T is column-major C_e^T = W_e^T(2f x h) X_e^T(h x cap).
    TROUPE_CUBLAS_CHECK(cublasGemmBatchedEx(
        blas_, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(2 * f), static_cast<int>(cap), static_cast<int>(h), &one,
        static_cast<const void* const*>(gate_up_ptrs.raw()), CUDA_R_16BF, static_cast<int>(h), p, CUDA_R_16BF,
        static_cast<int>(h), &zero_beta, const_cast<void* const*>(p + n_routed), CUDA_R_32F, static_cast<int>(2 * f),
        static_cast<int>(n_routed), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  }
  cuda::swiglu_to_bf16(gate_up.data<float>(), static_cast<std::uint16_t*>(act.raw()), n_routed * cap, f, s);
  {
    std::lock_guard lock(blas_mutex());
    TROUPE_CUBLAS_CHECK(cublasGemmBatchedEx(
        blas_, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(h), static_cast<int>(cap), static_cast<int>(f), &one,
        static_cast<const void* const*>(down_ptrs.raw()), CUDA_R_16BF, static_cast<int>(f), p + 2 * n_routed, CUDA_R_16BF,
        static_cast<int>(f), &zero_beta, const_cast<void* const*>(p + 3 * n_routed), CUDA_R_32F, static_cast<int>(h),
        static_cast<int>(n_routed), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  }
  cuda::moe_undispatch(rows.data<float>(), h, offsets.data<std::int32_t>(), order.data<std::int32_t>(),
                       static_cast<std::int32_t>(n_routed), cap, y.data<float>(), s);
}

void cuda_backend::routed_moe(const tensor& u, const moe_layer& moe, tensor& out, write_mode mode) {
  const auto t = u.dim(0), h = u.dim(1), k = static_cast<std::int64_t>(moe.top_k), experts = moe.router.dim(0);
  const auto& gate_up = moe.gate_up;
  const auto& down = moe.down;
  TROUPE_EXPECT(out.shape() == u.shape() && gate_up.size() == down.size() && !gate_up.empty() && moe.router.dim(1) == h &&
                    moe.router.type() == dtype::f32 && moe.bias.numel() == experts && k > 0 && k <= experts,
                "routed_moe", "u " + shape_to_string(u.shape()) + ", router " + shape_to_string(moe.router.shape()) +
                                  ", top-" + std::to_string(k));
  const auto n_routed = static_cast<std::int32_t>(gate_up.size());
  const auto f = down[0].dim(1);
  std::vector<std::int64_t> addresses;
  for (std::int32_t e = 0; e < n_routed; ++e) {
    TROUPE_EXPECT(gate_up[e].type() == dtype::bf16 && down[e].type() == dtype::bf16 && gate_up[e].dim(0) == 2 * f &&
                      gate_up[e].dim(1) == h && down[e].dim(0) == h && down[e].dim(1) == f,
                  "routed_moe", "expert " + std::to_string(e) + " matrices do not match");
    addresses.push_back(reinterpret_cast<std::int64_t>(gate_up[e].raw()));
  }
  for (std::int32_t e = 0; e < n_routed; ++e) addresses.push_back(reinterpret_cast<std::int64_t>(down[e].raw()));
  std::unique_lock lock(expert_tables_mutex_);
  expert_table& table = expert_tables_[gate_up[0].raw()];
  if (table.addresses != addresses) {
    const auto half = addresses.begin() + n_routed;
    tensor gu_ptr = tensor::empty({n_routed}, dtype::i64), down_ptr = tensor::empty({n_routed}, dtype::i64);
    std::copy(addresses.begin(), half, gu_ptr.data<std::int64_t>());
    std::copy(half, addresses.end(), down_ptr.data<std::int64_t>());
    table = {addresses, upload(gu_ptr, dtype::i64), upload(down_ptr, dtype::i64)};
  }
  const tensor d_gu = table.gate_up, d_down = table.down;
  lock.unlock();
  const std::int64_t slots = t * k;
  tensor idx = empty({t, k}, dtype::i32), gates = empty({t, k}, dtype::f32), y = empty({slots, h}, dtype::f32);
  tensor offsets = empty({n_routed + 1}, dtype::i32), order = empty({slots}, dtype::i32), active = empty({n_routed}, dtype::i32);
  tensor logits = empty({t, experts}, dtype::f32);
  linear(u, moe.router, logits, write_mode::overwrite);
  cuda::moe_route(logits.data<float>(), t, moe.bias.data<float>(), experts, moe.top_k, moe.scaling, n_routed,
                  idx.data<std::int32_t>(), gates.data<float>(), offsets.data<std::int32_t>(), order.data<std::int32_t>(),
                  active.data<std::int32_t>(), as_stream(stream_));
  if (t > cuda::gemv_max_rows) {
    routed_experts_on_tensor_cores(u, offsets, order, k, d_gu, d_down, f, y);
  } else {
    // Each row picks k distinct experts: an expert has at most t slots, and at most t * k experts have any.
    const auto max_active = static_cast<std::int32_t>(std::min<std::int64_t>(n_routed, slots));
    tensor act = empty({slots, f}, dtype::f32);
    cuda::grouped_expert_gemv_bf16(u.data<float>(), k, t, offsets.data<std::int32_t>(), order.data<std::int32_t>(),
                                   active.data<std::int32_t>(), max_active, static_cast<const std::uint16_t* const*>(d_gu.raw()),
                                   f, h, true, act.data<float>(), as_stream(stream_));
    cuda::grouped_expert_gemv_bf16(act.data<float>(), 1, t, offsets.data<std::int32_t>(), order.data<std::int32_t>(),
                                   active.data<std::int32_t>(), max_active, static_cast<const std::uint16_t* const*>(d_down.raw()),
                                   h, f, false, y.data<float>(), as_stream(stream_));
  }
  cuda::moe_combine(u.data<float>(), y.data<float>(), idx.data<std::int32_t>(), gates.data<float>(), t, static_cast<int>(k),
                    n_routed, h, mode == write_mode::accumulate, out.data<float>(), as_stream(stream_));
}

}  // namespace troupe
