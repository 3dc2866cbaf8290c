// Encoding throughput of one tokenizer file on one text file (one thread, text in memory,
// after a warm-up). Prints {"mb_per_s", "tokens", "seconds"} like the tiktoken side.
//   troupe_bench_tokenizer TOKENIZER TEXT_FILE
#include <chrono>
#include <cstdio>
#include <fstream>
#include <sstream>

#include "tokenizer/tokenizer.hpp"

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s TOKENIZER TEXT_FILE\n", argv[0]);
    return 2;
  }
  const auto tok = troupe::tokenizer::load(argv[1]);
  std::ifstream in(argv[2], std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  const std::string text = ss.str();
  tok.encode(text.substr(0, 100000));  // warm-up
  const auto t0 = std::chrono::steady_clock::now();
  const auto ids = tok.encode(text);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("{\"mb_per_s\": %.3f, \"tokens\": %zu, \"seconds\": %.3f}\n", text.size() / 1e6 / s, ids.size(), s);
  return 0;
}
