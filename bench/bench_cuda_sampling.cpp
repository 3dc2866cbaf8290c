// Choosing a step's tokens on the device (backend::sample, then the tokens downloaded) against
// the baseline the serving head had before: download the logits and pick on the host
// (sample_token, the same rule). Per batch size, vocabulary and rule; microseconds per step,
// median of the repetitions, both measured in the same run on the same logits.
//   troupe_bench_cuda_sampling [REPETITIONS]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "gpu/cuda/cuda_backend.hpp"
#include "model/sampler.hpp"

using namespace troupe;

namespace {

template <class F>
double median_us(int reps, F&& step) {
  std::vector<double> us;
  step();  // warm-up
  for (int i = 0; i < reps; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    step();
    us.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(us.begin(), us.end());
  return us[us.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  if (!cuda_backend::available()) {
    std::fprintf(stderr, "no CUDA device\n");
    return 1;
  }
  const int reps = argc > 1 ? std::atoi(argv[1]) : 50;
  cuda_backend gpu;
  std::printf("%s\n", gpu.name().c_str());
  const std::vector<std::pair<const char*, sampling_params>> rules = {
      {"greedy", {.temperature = 0.0f}},
      {"temperature 1", {.temperature = 1.0f}},
      {"top-k 50", {.temperature = 0.8f, .top_k = 50}},
      {"top-p 0.9", {.temperature = 0.8f, .top_p = 0.9f}},
      {"top-k 50 + top-p 0.9 + penalty 1.2", {.temperature = 0.8f, .top_k = 50, .top_p = 0.9f, .repetition_penalty = 1.2f}},
  };
  std::printf("| vocab | batch | rule | device us/step | host us/step (download + sample_token) | speedup |\n");
  std::printf("| --- | --- | --- | --- | --- | --- |\n");
  for (const std::int64_t vocab : {32768, 131072})
    for (const std::int64_t batch : {1, 8, 64}) {
      tensor host_logits = tensor::empty({batch, vocab}, dtype::f32);
      rng g(static_cast<std::uint64_t>(vocab + batch));
      for (std::int64_t i = 0; i < host_logits.numel(); ++i) host_logits.data<float>()[i] = 3.0f * static_cast<float>(g.normal());
      const tensor logits = gpu.upload(host_logits, dtype::f32);
      std::vector<std::int32_t> context(512);
      for (auto& c : context) c = static_cast<std::int32_t>(g.next() % static_cast<std::uint64_t>(vocab));
      tensor picked = gpu.empty({batch}, dtype::i32);
      for (const auto& [name, rule] : rules) {
        std::vector<token_draw> draws;
        for (std::int64_t r = 0; r < batch; ++r) draws.push_back({.row = r, .params = rule, .u = g.uniform(), .context = context});
        const double device = median_us(reps, [&] {
          gpu.sample(logits, draws, picked);
          (void)gpu.download(picked);
        });
        const double host = median_us(reps, [&] {
          const tensor l = gpu.download(logits);
          for (const auto& d : draws)
            (void)sample_token({l.data<float>() + d.row * vocab, static_cast<std::size_t>(vocab)}, d);
        });
        std::printf("| %lld | %lld | %s | %.1f | %.1f | %.1fx |\n", static_cast<long long>(vocab), static_cast<long long>(batch),
                    name, device, host, host / device);
      }
    }
  return 0;
}
