// Sampling on the device (backend::sample): one block per draw picks a token from its row of
// logits by sample_token()'s rule (gpu/sampling.hpp) without sorting the vocabulary. The k-th
// largest logit and the top-p cut are found by radix selection over order-preserving 32-bit
// keys of the logits (four 8-bit passes each: a histogram of counts, then of probability mass);
// ties at a cut are taken lowest id first, as the host's stable order takes them; the draw walks
// the kept tokens in id order. Masses are summed in double, as the host sums them, so the two
// differ only where u or top_p falls within rounding (~1e-7 relative: float exp) of a boundary.
// Cost: up to 14 passes over the row (from L2 after the first) per draw, each thread a
// contiguous chunk of ids; histograms per warp in shared memory.
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include <climits>
#include <cstdint>
#include <map>
#include <mutex>

#include "gpu/cuda/cuda_check.hpp"
#include "gpu/cuda/cuda_kernels.hpp"

namespace troupe::cuda {

namespace {

constexpr int sample_threads = 512;

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

constexpr int sample_warps = sample_threads / 32;

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
  float max_value;
  double total;
};

// The dynamic shared memory: per-warp histograms (a block-wide one would serialise the atomics
// of the thousands of logits that share a digit), then the context bitmask.
struct sample_scratch {
  double* warp_masses;        // [sample_warps][256]
  std::int32_t* warp_counts;  // [sample_warps][256]
  std::uint32_t* seen;        // [ceil(vocab / 32)], when penalised
};
constexpr std::size_t sample_histogram_bytes = sample_warps * 256 * (sizeof(double) + sizeof(std::int32_t));

// Calls f(i, logit, valid) for each id of a thread's chunk [begin, begin + per), in id order.
// Every thread runs the same number of iterations (per is a multiple of the piece); ids past the
// vocabulary come with valid = false. A piece's loads are all in flight at once (float4 where
// aligned): one serial load per logit would wait one memory latency each.
constexpr int sample_piece = 16;
template <class F>
__device__ void for_chunk(const float* row, std::int64_t vocab, std::int64_t begin, std::int64_t per, F&& f) {
  for (std::int64_t base = begin; base < begin + per; base += sample_piece) {
    float z[sample_piece];
    if (base + sample_piece <= vocab && (reinterpret_cast<std::uintptr_t>(row + base) & 15) == 0) {
#pragma unroll
      for (int j = 0; j < sample_piece; j += 4) {
        const float4 v = *reinterpret_cast<const float4*>(row + base + j);
        z[j] = v.x, z[j + 1] = v.y, z[j + 2] = v.z, z[j + 3] = v.w;
      }
    } else {
#pragma unroll
      for (int j = 0; j < sample_piece; ++j) z[j] = base + j < vocab ? row[base + j] : 0.0f;
    }
#pragma unroll
    for (int j = 0; j < sample_piece; ++j) f(base + j, z[j], base + j < vocab);
  }
}

// Sums the warps' histograms into sh.counts / sh.masses and clears them for the next pass.
__device__ void merge_histograms(sample_scratch& x, sample_shared& sh, bool masses) {
  __syncthreads();
  for (int b = threadIdx.x; b < 256; b += sample_threads) {
    std::int32_t c = 0;
    double m = 0;
    for (int w = 0; w < sample_warps; ++w) {
      if (masses) {
        m += x.warp_masses[w * 256 + b];
        x.warp_masses[w * 256 + b] = 0;
      } else {
        c += x.warp_counts[w * 256 + b];
        x.warp_counts[w * 256 + b] = 0;
      }
    }
    sh.counts[b] = c;
    sh.masses[b] = m;
  }
  __syncthreads();
}

// The block's largest value(i, logit) over a row and its id, lowest id on ties (thread 0 holds
// the result): greedy decoding's pick, and the softmax's shift.
template <class Value>
__device__ best block_argmax(const float* row, std::int64_t vocab, std::int64_t begin, std::int64_t per, Value&& value,
                             cub::BlockReduce<best, sample_threads>::TempStorage& storage) {
  best b{-INFINITY, INT_MAX};
  for_chunk(row, vocab, begin, per, [&](std::int64_t i, float z, bool valid) {
    z = value(i, z);
    if (valid && (z > b.value || b.id == INT_MAX)) b = {z, static_cast<std::int32_t>(i)};
  });
  return cub::BlockReduce<best, sample_threads>(storage).Reduce(b, best_of{});
}

// One block per row: ids of the argmax, as i32 and/or i64 (a null pointer is skipped).
__global__ void __launch_bounds__(sample_threads)
    argmax_kernel(const float* logits, std::int64_t vocab, std::int32_t* ids32, std::int64_t* ids64) {
  __shared__ cub::BlockReduce<best, sample_threads>::TempStorage storage;
  const std::int64_t per = (vocab + sample_threads * sample_piece - 1) / (sample_threads * sample_piece) * sample_piece;
  const best b = block_argmax(logits + blockIdx.x * vocab, vocab, per * threadIdx.x, per,
                              [](std::int64_t, float z) { return z; }, storage);
  if (threadIdx.x != 0) return;
  if (ids32) ids32[blockIdx.x] = b.id;
  if (ids64) ids64[blockIdx.x] = b.id;
}

__global__ void __launch_bounds__(sample_threads)
    sample_kernel(const float* logits, std::int64_t vocab, const sample_draw* draws, const std::int32_t* context,
                  std::int32_t* tokens) {
  extern __shared__ double dynamic_shared[];
  __shared__ sample_shared sh;
  sample_scratch x{dynamic_shared, reinterpret_cast<std::int32_t*>(dynamic_shared + sample_warps * 256),
                   reinterpret_cast<std::uint32_t*>(dynamic_shared + sample_warps * 256) + sample_warps * 256};
  const sample_draw d = draws[blockIdx.x];
  const float* row = logits + d.row * vocab;
  const std::int64_t per = (vocab + sample_threads * sample_piece - 1) / (sample_threads * sample_piece) * sample_piece;
  const std::int64_t begin = per * threadIdx.x;
  const bool penalised = d.penalty != 1.0f;
  const int warp = threadIdx.x >> 5;
  double* my_masses = x.warp_masses + warp * 256;
  std::int32_t* my_counts = x.warp_counts + warp * 256;

  for (int i = threadIdx.x; i < sample_warps * 256; i += sample_threads) x.warp_masses[i] = 0, x.warp_counts[i] = 0;
  if (penalised) {
    const std::int64_t words = (vocab + 31) / 32;
    for (std::int64_t w = threadIdx.x; w < words; w += sample_threads) x.seen[w] = 0;
    __syncthreads();
    for (std::int32_t c = d.context_begin + threadIdx.x; c < d.context_end; c += sample_threads) {
      const std::int32_t id = context[c];
      if (id >= 0 && id < vocab) atomicOr(&x.seen[id >> 5], 1u << (id & 31));
    }
  }
  __syncthreads();
  auto value = [&](std::int64_t i, float z) {
    if (!penalised || i >= vocab || !(x.seen[i >> 5] & (1u << (i & 31)))) return z;  // past the vocabulary: unused
    return z > 0 ? z / d.penalty : z * d.penalty;
  };

  // Greedy and the softmax's shift: the largest value, lowest id on ties.
  const best b = block_argmax(row, vocab, begin, per, value, sh.cub.best_reduce);
  if (threadIdx.x == 0) sh.max_value = b.value;
  if (d.temperature == 0.0f) {
    if (threadIdx.x == 0) tokens[blockIdx.x] = b.id;
    return;
  }
  __syncthreads();
  const float mx = sh.max_value;
  auto prob = [&](float v) { return expf((v - mx) / d.temperature); };

  // Top-k: radix-select the k-th largest key; `remaining` ends as how many of its ties to take.
  std::uint32_t k_key = 0;
  std::int32_t k_cut = INT_MAX;
  if (d.top_k > 0 && d.top_k < vocab) {
    std::uint32_t prefix = 0, mask = 0;
    if (threadIdx.x == 0) sh.remaining = d.top_k;
    for (int shift = 24; shift >= 0; shift -= 8) {
      for_chunk(row, vocab, begin, per, [&](std::int64_t i, float z, bool valid) {
        const std::uint32_t key = order_key(value(i, z));
        if (valid && (key & mask) == prefix) atomicAdd(&my_counts[(key >> shift) & 255], 1);
      });
      merge_histograms(x, sh, false);
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
    for_chunk(row, vocab, begin, per,
              [&](std::int64_t i, float z, bool valid) { ties += valid && order_key(value(i, z)) == k_key; });
    std::int32_t before;
    cub::BlockScan<std::int32_t, sample_threads>(sh.cub.count_scan).ExclusiveSum(ties, before);
    const std::int32_t want = sh.remaining;
    if (before < want && want <= before + ties) {
      std::int32_t n = before;
      for_chunk(row, vocab, begin, per, [&](std::int64_t i, float z, bool valid) {
        if (valid && order_key(value(i, z)) == k_key && ++n == want) sh.cut_id = static_cast<std::int32_t>(i);
      });
    }
    __syncthreads();
    k_cut = sh.cut_id;
  }
  auto in_top_k = [&](std::int64_t i, std::uint32_t key) { return key > k_key || (key == k_key && i <= k_cut); };

  double mass = 0;
  for_chunk(row, vocab, begin, per, [&](std::int64_t i, float z, bool valid) {
    const float v = value(i, z);
    if (valid && in_top_k(i, order_key(v))) mass += prob(v);
  });
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
      for_chunk(row, vocab, begin, per, [&](std::int64_t i, float z, bool valid) {
        const float v = value(i, z);
        const std::uint32_t key = order_key(v);
        if (valid && in_top_k(i, key) && (key & mask) == prefix)
          atomicAdd(&my_masses[(key >> shift) & 255], static_cast<double>(prob(v)));
      });
      merge_histograms(x, sh, true);
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
    for_chunk(row, vocab, begin, per, [&](std::int64_t i, float z, bool valid) {
      const float v = value(i, z);
      const std::uint32_t key = order_key(v);
      if (valid && key == p_key && in_top_k(i, key)) tie_mass += prob(v);
    });
    double before;
    cub::BlockScan<double, sample_threads>(sh.cub.mass_scan).ExclusiveSum(tie_mass, before);
    if (threadIdx.x == 0) sh.cut_id = INT_MAX;  // every tie, if rounding never reaches the target
    __syncthreads();
    const double above = sh.above;
    if (tie_mass > 0 && above + before < target && above + before + tie_mass >= target) {
      double m = above + before;
      bool found = false;
      for_chunk(row, vocab, begin, per, [&](std::int64_t i, float z, bool valid) {
        const float v = value(i, z);
        const std::uint32_t key = order_key(v);
        if (!found && valid && key == p_key && in_top_k(i, key) && (m += prob(v)) >= target) {
          sh.cut_id = static_cast<std::int32_t>(i);
          found = true;
        }
      });
    }
    __syncthreads();
    p_cut = sh.cut_id;
    mass = 0;
    for_chunk(row, vocab, begin, per, [&](std::int64_t i, float z, bool valid) {
      const float v = value(i, z);
      const std::uint32_t key = order_key(v);
      if (valid && in_top_k(i, key) && (key > p_key || (key == p_key && i <= p_cut))) mass += prob(v);
    });
    total = cub::BlockReduce<double, sample_threads>(sh.cub.sum_reduce).Sum(mass);
    if (threadIdx.x == 0) sh.total = total;
    __syncthreads();
    total = sh.total;
  }
  auto weight = [&](std::int64_t i, float z, bool valid) {
    const float v = value(i, z);
    const std::uint32_t key = order_key(v);
    const bool kept = valid && in_top_k(i, key) && (key > p_key || (key == p_key && i <= p_cut));
    return kept ? static_cast<float>(prob(v) / total) : 0.0f;
  };

  // The draw: the first id (in id order) where the cumulative weight passes u.
  double chunk_weight = 0;
  std::int32_t last = -1;
  for_chunk(row, vocab, begin, per, [&](std::int64_t i, float z, bool valid) {
    const float w = weight(i, z, valid);
    if (w > 0.0f) {
      chunk_weight += w;
      last = static_cast<std::int32_t>(i);
    }
  });
  double before;
  cub::BlockScan<double, sample_threads>(sh.cub.mass_scan).ExclusiveSum(chunk_weight, before);
  if (threadIdx.x == 0) sh.cut_id = -1;
  __syncthreads();
  if (chunk_weight > 0 && before <= d.u && d.u < before + chunk_weight) {
    double acc = before;
    bool found = false;
    for_chunk(row, vocab, begin, per, [&](std::int64_t i, float z, bool valid) {
      const float w = weight(i, z, valid);
      if (!found && w > 0.0f && d.u < (acc += w)) {
        sh.cut_id = static_cast<std::int32_t>(i);
        found = true;
      }
    });
  }
  __syncthreads();
  const std::int32_t picked = sh.cut_id;
  last = cub::BlockReduce<std::int32_t, sample_threads>(sh.cub.max_reduce).Reduce(last, larger{});
  if (threadIdx.x == 0) tokens[blockIdx.x] = picked >= 0 ? picked : (last >= 0 ? last : 0);
}

}  // namespace

void argmax_rows(const float* logits, std::int64_t rows, std::int64_t vocab, std::int32_t* ids32, std::int64_t* ids64,
                 cudaStream_t s) {
  if (rows == 0) return;
  argmax_kernel<<<static_cast<unsigned>(rows), sample_threads, 0, s>>>(logits, vocab, ids32, ids64);
  TROUPE_CUDA_CHECK_LAUNCH();
}

void sample(const float* logits, std::int64_t vocab, const sample_draw* draws, std::int64_t n, const std::int32_t* context,
            bool penalised, std::int32_t* tokens, cudaStream_t s) {
  if (n == 0) return;
  const std::size_t bytes = sample_histogram_bytes + (penalised ? static_cast<std::size_t>((vocab + 31) / 32) * 4 : 0);
  {
    // Raised once per device to the largest size asked (a driver call, not one per step).
    static std::mutex mutex;
    static std::map<int, std::size_t> raised;
    int device = 0;
    TROUPE_CUDA_CHECK(cudaGetDevice(&device));
    std::lock_guard lock(mutex);
    if (raised[device] < bytes) {
      TROUPE_CUDA_CHECK(cudaFuncSetAttribute(sample_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
      raised[device] = bytes;
    }
  }
  sample_kernel<<<static_cast<unsigned>(n), sample_threads, bytes, s>>>(logits, vocab, draws, context, tokens);
  TROUPE_CUDA_CHECK_LAUNCH();
}

}  // namespace troupe::cuda
