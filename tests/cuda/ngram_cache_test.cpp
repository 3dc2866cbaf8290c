// The device N-gram cache against the CPU hasher: many sequences decoded in interleaved
// batches over token streams with EOS-separated documents; ids must be identical and the
// cached contexts equal. Skips on machines without a GPU.
#include <gtest/gtest.h>

#include <cuda_runtime_api.h>

#include <random>

#include "gpu/cuda/cuda_check.hpp"
#include "gpu/cuda/ngram_cache.hpp"
#include "model/config.hpp"
#include "model/ngram_hash.hpp"

namespace troupe {
namespace {

bool have_gpu() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

model_config config(std::int64_t vocab, std::int64_t n, std::int64_t k, double ratio) {
  model_config c;
  c.architecture = "LongcatFlashNgramForCausalLM";
  c.embedding = embedding_kind::ngram;
  c.vocab_size = vocab;
  c.hidden_size = 12 * (n - 1) * k;
  c.emb_neighbor_num = n;
  c.emb_split_num = k;
  c.ngram_vocab_size_ratio = ratio;
  c.eos_token_id = 2;
  return c;
}

template <class T>
struct device_buffer {
  T* p = nullptr;
  explicit device_buffer(std::size_t n) { TROUPE_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&p), sizeof(T) * (n ? n : 1))); }
  ~device_buffer() { cudaFree(p); }
};

void check_against_cpu(const model_config& c, int sequences, int steps, unsigned seed) {
  ngram_hasher cpu(c);
  device_ngram_cache gpu(c, sequences);
  cudaStream_t stream;
  TROUPE_CUDA_CHECK(cudaStreamCreate(&stream));
  std::vector<ngram_context> contexts(static_cast<std::size_t>(sequences));
  std::mt19937 rng(seed);
  std::uniform_int_distribution<std::int32_t> token(0, static_cast<std::int32_t>(c.vocab_size - 1));
  const int e = gpu.num_tables();
  device_buffer<std::int32_t> d_tokens(static_cast<std::size_t>(sequences)), d_slots(static_cast<std::size_t>(sequences));
  device_buffer<std::int64_t> d_ids(static_cast<std::size_t>(sequences * e));
  for (int step = 0; step < steps; ++step) {
    // A random subset of the sequences decodes this step, in a shuffled order.
    std::vector<std::int32_t> slots, tokens;
    for (int s = 0; s < sequences; ++s)
      if (rng() % 3) slots.push_back(s);
    std::shuffle(slots.begin(), slots.end(), rng);
    for (std::size_t i = 0; i < slots.size(); ++i) tokens.push_back(rng() % 7 == 0 ? c.eos_token_id : token(rng));
    const int n = static_cast<int>(slots.size());
    TROUPE_CUDA_CHECK(cudaMemcpyAsync(d_tokens.p, tokens.data(), sizeof(std::int32_t) * n, cudaMemcpyHostToDevice, stream));
    TROUPE_CUDA_CHECK(cudaMemcpyAsync(d_slots.p, slots.data(), sizeof(std::int32_t) * n, cudaMemcpyHostToDevice, stream));
    TROUPE_CUDA_CHECK(cudaMemsetAsync(d_ids.p, 0xff, sizeof(std::int64_t) * sequences * e, stream));  // poison
    gpu.hash_decode_async(d_tokens.p, d_slots.p, n, d_ids.p, stream);
    std::vector<std::int64_t> got(static_cast<std::size_t>(n * e));
    TROUPE_CUDA_CHECK(cudaMemcpyAsync(got.data(), d_ids.p, sizeof(std::int64_t) * got.size(), cudaMemcpyDeviceToHost, stream));
    TROUPE_CUDA_CHECK(cudaStreamSynchronize(stream));
    for (int i = 0; i < n; ++i) {
      std::vector<std::int64_t> want(static_cast<std::size_t>(e));
      cpu.hash(std::span<const std::int32_t>(&tokens[static_cast<std::size_t>(i)], 1), contexts[static_cast<std::size_t>(slots[i])],
               want.data());
      for (int t = 0; t < e; ++t) ASSERT_EQ(got[static_cast<std::size_t>(i * e + t)], want[static_cast<std::size_t>(t)]) << "step " << step << " table " << t;
    }
  }
  for (int s = 0; s < sequences; ++s) EXPECT_EQ(gpu.context(s, stream), contexts[static_cast<std::size_t>(s)].tail);
  TROUPE_CUDA_CHECK(cudaStreamDestroy(stream));
}

}  // namespace

TEST(cuda_ngram_cache, matches_cpu_hasher_small_tables) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  check_against_cpu(config(97, 3, 2, 3), 17, 200, 1);
}

TEST(cuda_ngram_cache, matches_cpu_hasher_lite_sizes) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  check_against_cpu(config(131072, 4, 4, 78), 64, 100, 2);  // released Lite: 12 tables of ~1e7 rows
}

TEST(cuda_ngram_cache, reset_starts_a_new_sequence) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  const auto c = config(97, 4, 1, 3);
  device_ngram_cache gpu(c, 2);
  cudaStream_t stream;
  TROUPE_CUDA_CHECK(cudaStreamCreate(&stream));
  device_buffer<std::int32_t> d_tok(1), d_slot(1);
  device_buffer<std::int64_t> d_ids(3);
  const std::int32_t slot = 1;
  TROUPE_CUDA_CHECK(cudaMemcpy(d_slot.p, &slot, 4, cudaMemcpyHostToDevice));
  for (std::int32_t t : {5, 6, 7, 8}) {
    TROUPE_CUDA_CHECK(cudaMemcpy(d_tok.p, &t, 4, cudaMemcpyHostToDevice));
    gpu.hash_decode_async(d_tok.p, d_slot.p, 1, d_ids.p, stream);
  }
  EXPECT_EQ(gpu.context(1, stream), (std::vector<std::int32_t>{6, 7, 8}));
  gpu.reset_async(1, stream);
  EXPECT_TRUE(gpu.context(1, stream).empty());
  TROUPE_CUDA_CHECK(cudaStreamDestroy(stream));
}

}  // namespace troupe
