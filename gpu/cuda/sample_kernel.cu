// Sampling on the device (backend::sample): one block per draw picks a token from its row of
// logits by sample_token()'s rule (gpu/sampling.hpp) without sorting the vocabulary. The k-th
// largest logit and the top-p cut are found by radix selection over order-preserving 32-bit
// keys of the logits (four 8-bit passes each: a histogram of counts, then of probability mass);
// ties at a cut are taken lowest id first, as the host's stable order takes them; the draw walks
// the kept tokens in id order. Masses are summed in double, as the host sums them, so the two
// differ only where u or top_p falls within rounding (~1e-7 relative: float exp) of a boundary.
// Cost: up to 14 passes over the row from L2 per draw; V = 32768 is ~128 KB a pass.
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include <climits>
#include <cstdint>

#include "gpu/cuda/cuda_check.hpp"
#include "gpu/cuda/cuda_kernels.hpp"

namespace troupe::cuda {

namespace {

constexpr int sample_threads = 1024;

// Keys that order as the floats do (+0 and -0 equal, as the host compares them).
__device__ std::uint32_t order_key(float f) {
  if (f == 0.0f) f = 0.0f;
  const std::uint32_t b = __float_as_uint(f);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

struct best {
  float value;
  std::int32_t id;
};
struct best_of {
  __device__ best operator()(const best& a, const best& b) const {
    return (b.value > a.value || (b.value == a.value && b.id < a.id)) ? b : a;
  }
};

struct larger {
  __device__ std::int32_t operator()(std::int32_t a, std::int32_t b) const { return a > b ? a : b; }
};

struct sample_shared {
  union {
    cub::BlockReduce<best, sample_threads>::TempStorage best_reduce;
    cub::BlockReduce<double, sample_threads>::TempStorage sum_reduce;
    cub::BlockReduce<std::int32_t, sample_threads>::TempStorage max_reduce;
    cub::BlockScan<std::int32_t, sample_threads>::TempStorage count_scan;
    cub::BlockScan<double, sample_threads>::TempStorage mass_scan;
  } cub;
  std::int32_t counts[256];
  double masses[256];
  std::uint32_t prefix;
  std::int32_t remaining, cut_id;
  double above;
  float max_value, total_inv;
  double total;
};

// One thread's share of the row: a contiguous run of ids, so scans over threads follow id order.
struct chunk {
  std::int64_t begin, end;
};

__global__ void __launch_bounds__(sample_threads)
    sample_kernel(const float* logits, std::int64_t vocab, const sample_draw* draws, const std::int32_t* context,
                  std::int32_t* tokens) {
  extern __shared__ std::uint32_t seen[];  // context bitmask, when the draw has a penalty
  __shared__ sample_shared sh;
  const sample_draw d = draws[blockIdx.x];
  const float* row = logits + d.row * vocab;
  const std::int64_t per = (vocab + sample_threads - 1) / sample_threads;
  const std::int64_t first = per * threadIdx.x, stop = first + per;
  const chunk mine{first < vocab ? first : vocab, stop < vocab ? stop : vocab};
  const bool penalised = d.penalty != 1.0f;

  if (penalised) {
    const std::int64_t words = (vocab + 31) / 32;
    for (std::int64_t w = threadIdx.x; w < words; w += sample_threads) seen[w] = 0;
    __syncthreads();
    for (std::int32_t c = d.context_begin + threadIdx.x; c < d.context_end; c += sample_threads) {
      const std::int32_t id = context[c];
      if (id >= 0 && id < vocab) atomicOr(&seen[id >> 5], 1u << (id & 31));
    }
    __syncthreads();
  }
  auto value = [&](std::int64_t i) {
    const float z = row[i];
    if (!penalised || !(seen[i >> 5] & (1u << (i & 31)))) return z;
    return z > 0 ? z / d.penalty : z * d.penalty;
  };

  // Greedy and the softmax's shift: the largest value, lowest id on ties.
  best b{-INFINITY, INT_MAX};
  for (std::int64_t i = mine.begin; i < mine.end; ++i) {
    const float z = value(i);
    if (z > b.value || b.id == INT_MAX) b = {z, static_cast<std::int32_t>(i)};
  }
  b = cub::BlockReduce<best, sample_threads>(sh.cub.best_reduce).Reduce(b, best_of{});
  if (threadIdx.x == 0) sh.max_value = b.value;
  if (d.temperature == 0.0f) {
    if (threadIdx.x == 0) tokens[blockIdx.x] = b.id;
    return;
  }
  __syncthreads();
  const float mx = sh.max_value;
  auto prob = [&](std::int64_t i) { return expf((value(i) - mx) / d.temperature); };

  // Top-k: radix-select the k-th largest key; `remaining` ends as how many of its ties to take.
  std::uint32_t k_key = 0;
  std::int32_t k_cut = INT_MAX;
  if (d.top_k > 0 && d.top_k < vocab) {
    std::uint32_t prefix = 0, mask = 0;
    if (threadIdx.x == 0) sh.remaining = d.top_k;
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int i = threadIdx.x; i < 256; i += sample_threads) sh.counts[i] = 0;
      __syncthreads();
      for (std::int64_t i = mine.begin; i < mine.end; ++i) {
        const std::uint32_t key = order_key(value(i));
        if ((key & mask) == prefix) atomicAdd(&sh.counts[(key >> shift) & 255], 1);
      }
      __syncthreads();
      if (threadIdx.x == 0) {
        std::int32_t above = 0;
        int digit = 255;
        for (; digit > 0 && above + sh.counts[digit] < sh.remaining; --digit) above += sh.counts[digit];
        sh.remaining -= above;
        sh.prefix = prefix | (static_cast<std::uint32_t>(digit) << shift);
      }
      __syncthreads();
      prefix = sh.prefix;
      mask |= 255u << shift;
    }
    k_key = prefix;
    // The id of the remaining-th tie (id order): the last one kept.
    std::int32_t ties = 0;
    for (std::int64_t i = mine.begin; i < mine.end; ++i) ties += order_key(value(i)) == k_key;
    std::int32_t before;
    cub::BlockScan<std::int32_t, sample_threads>(sh.cub.count_scan).ExclusiveSum(ties, before);
    const std::int32_t want = sh.remaining;
    if (before < want && want <= before + ties) {
      std::int32_t n = before;
      for (std::int64_t i = mine.begin; i < mine.end; ++i)
        if (order_key(value(i)) == k_key && ++n == want) sh.cut_id = static_cast<std::int32_t>(i);
    }
    __syncthreads();
    k_cut = sh.cut_id;
  }
  auto in_top_k = [&](std::int64_t i, std::uint32_t key) { return key > k_key || (key == k_key && i <= k_cut); };

  double mass = 0;
  for (std::int64_t i = mine.begin; i < mine.end; ++i)
    if (in_top_k(i, order_key(value(i)))) mass += prob(i);
  double total = cub::BlockReduce<double, sample_threads>(sh.cub.sum_reduce).Sum(mass);
  if (threadIdx.x == 0) sh.total = total;
  __syncthreads();
  total = sh.total;

  // Top-p: radix-select the key where the mass from the top reaches top_p, then its ties.
  std::uint32_t p_key = 0;
  std::int32_t p_cut = INT_MAX;
  if (d.top_p < 1.0f) {
    const double target = static_cast<double>(d.top_p) * total;
    std::uint32_t prefix = 0, mask = 0;
    if (threadIdx.x == 0) sh.above = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int i = threadIdx.x; i < 256; i += sample_threads) sh.masses[i] = 0;
      __syncthreads();
      for (std::int64_t i = mine.begin; i < mine.end; ++i) {
        const std::uint32_t key = order_key(value(i));
        if (in_top_k(i, key) && (key & mask) == prefix) atomicAdd(&sh.masses[(key >> shift) & 255], static_cast<double>(prob(i)));
      }
      __syncthreads();
      if (threadIdx.x == 0) {
        // The digit where the mass reaches the target; rounding that never reaches it keeps
        // everything down to the lowest digit with mass.
        double above = sh.above;
        int digit = 255, lowest = -1;
        for (int g = 255; g >= 0; --g)
          if (sh.masses[g] > 0) lowest = g;
        for (; digit > 0 && digit > lowest && above + sh.masses[digit] < target; --digit) above += sh.masses[digit];
        sh.above = above;
        sh.prefix = prefix | (static_cast<std::uint32_t>(digit) << shift);
      }
      __syncthreads();
      prefix = sh.prefix;
      mask |= 255u << shift;
    }
    p_key = prefix;
    // The first tie (id order) at which the mass reaches the target: the last one kept.
    double tie_mass = 0;
    for (std::int64_t i = mine.begin; i < mine.end; ++i) {
      const std::uint32_t key = order_key(value(i));
      if (key == p_key && in_top_k(i, key)) tie_mass += prob(i);
    }
    double before;
    cub::BlockScan<double, sample_threads>(sh.cub.mass_scan).ExclusiveSum(tie_mass, before);
    if (threadIdx.x == 0) sh.cut_id = INT_MAX;  // every tie, if rounding never reaches the target
    __syncthreads();
    const double above = sh.above;
    if (tie_mass > 0 && above + before < target && above + before + tie_mass >= target) {
      double m = above + before;
      for (std::int64_t i = mine.begin; i < mine.end; ++i) {
        const std::uint32_t key = order_key(value(i));
        if (key == p_key && in_top_k(i, key) && (m += prob(i)) >= target) {
          sh.cut_id = static_cast<std::int32_t>(i);
          break;
        }
      }
    }
    __syncthreads();
    p_cut = sh.cut_id;
    mass = 0;
    for (std::int64_t i = mine.begin; i < mine.end; ++i) {
      const std::uint32_t key = order_key(value(i));
      if (in_top_k(i, key) && (key > p_key || (key == p_key && i <= p_cut))) mass += prob(i);
    }
    total = cub::BlockReduce<double, sample_threads>(sh.cub.sum_reduce).Sum(mass);
    if (threadIdx.x == 0) sh.total = total;
    __syncthreads();
    total = sh.total;
  }
  auto weight = [&](std::int64_t i) {
    const std::uint32_t key = order_key(value(i));
    const bool kept = in_top_k(i, key) && (key > p_key || (key == p_key && i <= p_cut));
    return kept ? static_cast<float>(prob(i) / total) : 0.0f;
  };

  // The draw: the first id (in id order) where the cumulative weight passes u.
  double chunk_weight = 0;
  std::int32_t last = -1;
  for (std::int64_t i = mine.begin; i < mine.end; ++i) {
    const float w = weight(i);
    if (w > 0.0f) {
      chunk_weight += w;
      last = static_cast<std::int32_t>(i);
    }
  }
  double before;
  cub::BlockScan<double, sample_threads>(sh.cub.mass_scan).ExclusiveSum(chunk_weight, before);
  if (threadIdx.x == 0) sh.cut_id = -1;
  __syncthreads();
  if (chunk_weight > 0 && before <= d.u && d.u < before + chunk_weight) {
    double acc = before;
    for (std::int64_t i = mine.begin; i < mine.end; ++i) {
      const float w = weight(i);
      if (w > 0.0f && d.u < (acc += w)) {
        sh.cut_id = static_cast<std::int32_t>(i);
        break;
      }
    }
  }
  __syncthreads();
  const std::int32_t picked = sh.cut_id;
  last = cub::BlockReduce<std::int32_t, sample_threads>(sh.cub.max_reduce).Reduce(last, larger{});
  if (threadIdx.x == 0) tokens[blockIdx.x] = picked >= 0 ? picked : (last >= 0 ? last : 0);
}

}  // namespace

void sample(const float* logits, std::int64_t vocab, const sample_draw* draws, std::int64_t n, const std::int32_t* context,
            bool penalised, std::int32_t* tokens, cudaStream_t s) {
  if (n == 0) return;
  const std::size_t seen_bytes = penalised ? static_cast<std::size_t>((vocab + 31) / 32) * 4 : 0;
  if (seen_bytes > 48 * 1024)
    TROUPE_CUDA_CHECK(cudaFuncSetAttribute(sample_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(seen_bytes)));
  sample_kernel<<<static_cast<unsigned>(n), sample_threads, seen_bytes, s>>>(logits, vocab, draws, context, tokens);
  TROUPE_CUDA_CHECK_LAUNCH();
}

}  // namespace troupe::cuda
