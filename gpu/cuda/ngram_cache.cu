#include "gpu/cuda/ngram_cache.hpp"

#include <algorithm>

#include "gpu/cuda/cuda_check.hpp"
#include "gpu/cuda/ngram_cache.cuh"
#include "model/config.hpp"

namespace troupe {
namespace {

// One block per sequence, one thread per table.
__global__ void hash_decode_kernel(const std::int32_t* tokens, const std::int32_t* slots, std::int64_t* ids,
                                   ngram_cache_view c, bool table_major) {
  const int i = blockIdx.x;
  const int slot = slots[i];
  const std::int32_t x = tokens[i];
  for (int t = threadIdx.x; t < c.num_tables; t += blockDim.x)
    ids[table_major ? static_cast<std::int64_t>(t) * gridDim.x + i : static_cast<std::int64_t>(i) * c.num_tables + t] =
        ngram_table_id(c, slot, x, t);
  __syncthreads();  // every table has read the old context before it moves
  if (threadIdx.x == 0) ngram_advance(c, slot, x);
}

}  // namespace

device_ngram_cache::device_ngram_cache(const model_config& c, int max_sequences)
    : num_tables_(static_cast<int>(c.num_ngram_tables())),
      width_(static_cast<int>(c.emb_neighbor_num > 0 ? c.emb_neighbor_num - 1 : 0)),
      max_sequences_(max_sequences),
      eos_(c.eos_token_id) {
  std::vector<std::int64_t> moduli(static_cast<std::size_t>(num_tables_));
  std::vector<std::int64_t> powers(static_cast<std::size_t>(num_tables_ * width_), 0);
  for (int t = 0; t < num_tables_; ++t) {
    const std::int64_t m = c.ngram_table_rows(t);
    // Partial sums stay below 2 * M and products below V * M: both must fit in 64 bits.
    if (static_cast<double>(c.vocab_size) * static_cast<double>(m) > 9.0e18)
      throw std::invalid_argument("device_ngram_cache: table " + std::to_string(t) + " too large for 64-bit hashing");
    moduli[static_cast<std::size_t>(t)] = m;
    unsigned long long p = 1;
    for (int k = 1; k < c.ngram_table_order(t); ++k) {
      p = static_cast<unsigned long long>((static_cast<unsigned __int128>(p) * c.vocab_size) % m);
      powers[static_cast<std::size_t>(t * width_ + k - 1)] = p ? static_cast<std::int64_t>(p) : m;  // 0 marks "no term"
    }
  }
  // A power of 0 (V^k divisible by M) contributes nothing; storing M keeps the sum exact mod M
  // while leaving 0 free to mark orders beyond the table's.
  TROUPE_CUDA_CHECK(cudaMalloc(&moduli_, sizeof(std::int64_t) * moduli.size()));
  TROUPE_CUDA_CHECK(cudaMalloc(&powers_, sizeof(std::int64_t) * (powers.empty() ? 1 : powers.size())));
  TROUPE_CUDA_CHECK(cudaMalloc(&tails_, sizeof(std::int32_t) * static_cast<std::size_t>(max_sequences) * (width_ ? width_ : 1)));
  TROUPE_CUDA_CHECK(cudaMalloc(&lengths_, sizeof(std::int32_t) * static_cast<std::size_t>(max_sequences)));
  TROUPE_CUDA_CHECK(cudaMemcpy(moduli_, moduli.data(), sizeof(std::int64_t) * moduli.size(), cudaMemcpyHostToDevice));
  if (!powers.empty())
    TROUPE_CUDA_CHECK(cudaMemcpy(powers_, powers.data(), sizeof(std::int64_t) * powers.size(), cudaMemcpyHostToDevice));
  TROUPE_CUDA_CHECK(cudaMemset(lengths_, 0, sizeof(std::int32_t) * static_cast<std::size_t>(max_sequences)));
  TROUPE_CUDA_CHECK(cudaMalloc(&arrivals_, sizeof(unsigned)));
  TROUPE_CUDA_CHECK(cudaMemset(arrivals_, 0, sizeof(unsigned)));
}

device_ngram_cache::~device_ngram_cache() {
  cudaFree(moduli_);
  cudaFree(powers_);
  cudaFree(tails_);
  cudaFree(lengths_);
  cudaFree(arrivals_);
}

void device_ngram_cache::reset_async(int slot, cudaStream_t stream) {
  if (slot < 0 || slot >= max_sequences_) throw std::out_of_range("device_ngram_cache: slot out of range");
  TROUPE_CUDA_CHECK(cudaMemsetAsync(lengths_ + slot, 0, sizeof(std::int32_t), stream));
}

void device_ngram_cache::set(int slot, const std::int32_t* tail, std::size_t size, cudaStream_t stream) {
  if (slot < 0 || slot >= max_sequences_) throw std::out_of_range("device_ngram_cache: slot out of range");
  const auto len = static_cast<std::int32_t>(std::min<std::size_t>(size, static_cast<std::size_t>(width_)));
  if (len)
    TROUPE_CUDA_CHECK(cudaMemcpyAsync(tails_ + static_cast<std::int64_t>(slot) * width_, tail + (size - len),
                                      sizeof(std::int32_t) * static_cast<std::size_t>(len), cudaMemcpyHostToDevice, stream));
  TROUPE_CUDA_CHECK(cudaMemcpyAsync(lengths_ + slot, &len, sizeof len, cudaMemcpyHostToDevice, stream));
  TROUPE_CUDA_CHECK(cudaStreamSynchronize(stream));  // pageable sources (`len` lives on this frame)
}

void device_ngram_cache::hash_decode_async(const std::int32_t* tokens, const std::int32_t* slots, int count,
                                           std::int64_t* ids, cudaStream_t stream, bool table_major) {
  if (count == 0 || num_tables_ == 0) return;
  const int threads = ((num_tables_ + 31) / 32) * 32;
  hash_decode_kernel<<<count, threads, 0, stream>>>(tokens, slots, ids, view(), table_major);
  TROUPE_CUDA_CHECK_LAUNCH();
}

std::vector<std::int32_t> device_ngram_cache::context(int slot, cudaStream_t stream) const {
  std::int32_t len = 0;
  std::vector<std::int32_t> out(static_cast<std::size_t>(width_));
  TROUPE_CUDA_CHECK(cudaMemcpyAsync(&len, lengths_ + slot, sizeof len, cudaMemcpyDeviceToHost, stream));
  if (width_)
    TROUPE_CUDA_CHECK(cudaMemcpyAsync(out.data(), tails_ + static_cast<std::int64_t>(slot) * width_,
                                      sizeof(std::int32_t) * out.size(), cudaMemcpyDeviceToHost, stream));
  TROUPE_CUDA_CHECK(cudaStreamSynchronize(stream));
  out.resize(static_cast<std::size_t>(len));
  return out;
}

}  // namespace troupe
