#include "tokenizer/bpe_trainer.hpp"

#include <algorithm>
#include <fstream>
#include <iostream>
#include <map>
#include <set>
#include <sstream>
#include <unordered_map>

#include "protocol/errors.hpp"
#include "protocol/json_writer.hpp"
#include "tokenizer/byte_level.hpp"
#include "tokenizer/pretokenizer.hpp"

namespace troupe {
namespace {

constexpr const char* split_pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
constexpr std::int32_t num_specials = 3;
constexpr std::int32_t first_byte_id = num_specials;

using pair_t = std::pair<std::int32_t, std::int32_t>;

struct word {
  std::vector<std::int32_t> symbols;
  std::int64_t count;
};

}  // namespace

std::string train_bpe(const std::vector<std::filesystem::path>& corpus, const bpe_training_options& options) {
  if (options.vocab_size < num_specials + 256)
    throw input_error("train-tokenizer: vocab_size must be at least " + std::to_string(num_specials + 256));
  // 1. Count the distinct pieces of the corpus.
  const pretokenizer split(split_pattern, pretokenizer::gaps::kept);
  std::unordered_map<std::string, std::int64_t> piece_counts;
  std::int64_t total_bytes = 0;
  for (const auto& file : corpus) {
    std::ifstream in(file, std::ios::binary);
    if (!in) throw input_error(file.string() + ": cannot open the corpus file");
    std::ostringstream ss;
    ss << in.rdbuf();
    std::string text = ss.str();
    if (options.max_bytes > 0 && static_cast<std::int64_t>(text.size()) > options.max_bytes)
      text.resize(static_cast<std::size_t>(options.max_bytes));
    total_bytes += static_cast<std::int64_t>(text.size());
    split.split(text, [&](std::string_view p) { ++piece_counts[std::string(p)]; });
  }
  if (piece_counts.empty()) throw input_error("train-tokenizer: the corpus is empty");

  // 2. Words as symbol sequences, and the pair statistics with an index pair -> words.
  std::vector<word> words;
  std::vector<std::pair<std::string, std::int64_t>> sorted(piece_counts.begin(), piece_counts.end());
  std::sort(sorted.begin(), sorted.end());  // deterministic word order
  for (const auto& [piece, count] : sorted) {
    word w{{}, count};
    for (unsigned char c : piece) w.symbols.push_back(first_byte_id + c);
    words.push_back(std::move(w));
  }
  std::map<pair_t, std::int64_t> pair_counts;
  std::map<pair_t, std::set<std::size_t>> where;
  for (std::size_t i = 0; i < words.size(); ++i)
    for (std::size_t j = 0; j + 1 < words[i].symbols.size(); ++j) {
      const pair_t p{words[i].symbols[j], words[i].symbols[j + 1]};
      pair_counts[p] += words[i].count;
      where[p].insert(i);
    }
  // Ordered by (count desc, pair asc) for deterministic picks.
  std::set<std::pair<std::int64_t, pair_t>, std::greater<>> by_count_desc;
  auto key = [](std::int64_t count, pair_t p) { return std::make_pair(count, pair_t{-p.first, -p.second}); };
  for (const auto& [p, c] : pair_counts) by_count_desc.insert(key(c, p));

  std::vector<std::string> token_bytes(static_cast<std::size_t>(first_byte_id + 256));
  for (int b = 0; b < 256; ++b) token_bytes[static_cast<std::size_t>(first_byte_id + b)] = std::string(1, static_cast<char>(b));
  std::vector<pair_t> merges;
  auto adjust = [&](pair_t p, std::int64_t delta, std::size_t word_idx) {
    auto it = pair_counts.find(p);
    const std::int64_t old = it == pair_counts.end() ? 0 : it->second;
    if (old) by_count_desc.erase(key(old, p));
    const std::int64_t now = old + delta;
    if (now > 0) {
      pair_counts[p] = now;
      by_count_desc.insert(key(now, p));
    } else if (it != pair_counts.end()) {
      pair_counts.erase(it);
    }
    if (delta > 0) where[p].insert(word_idx);
  };

  const std::int64_t num_merges = options.vocab_size - num_specials - 256;
  for (std::int64_t m = 0; m < num_merges && !by_count_desc.empty(); ++m) {
    const auto [count, neg] = *by_count_desc.begin();
    if (count < options.min_pair_count) break;
    const pair_t best{-neg.first, -neg.second};
    const auto new_id = static_cast<std::int32_t>(token_bytes.size());
    token_bytes.push_back(token_bytes[static_cast<std::size_t>(best.first)] + token_bytes[static_cast<std::size_t>(best.second)]);
    merges.push_back(best);
    const std::set<std::size_t> affected = std::move(where[best]);
    where.erase(best);
    for (std::size_t wi : affected) {
      auto& s = words[wi].symbols;
      const std::int64_t c = words[wi].count;
      for (std::size_t j = 0; j + 1 < s.size();) {
        if (s[j] != best.first || s[j + 1] != best.second) {
          ++j;
          continue;
        }
        if (j > 0) adjust({s[j - 1], s[j]}, -c, wi);
        if (j + 2 < s.size()) adjust({s[j + 1], s[j + 2]}, -c, wi);
        adjust(best, -c, wi);
        s[j] = new_id;
        s.erase(s.begin() + static_cast<std::ptrdiff_t>(j) + 1);
        if (j > 0) adjust({s[j - 1], s[j]}, c, wi);
        if (j + 1 < s.size()) adjust({s[j], s[j + 1]}, c, wi);
        ++j;
      }
    }
    if ((m + 1) % 500 == 0) std::cerr << "[train-tokenizer] " << m + 1 << " merges\n";
  }
  std::cerr << "[train-tokenizer] " << total_bytes / 1e6 << " MB of text, " << words.size() << " distinct pieces, "
            << merges.size() << " merges, vocabulary " << token_bytes.size() << "\n";

  json_writer w;
  w.begin_object();
  w.key("version").value("1.0");
  w.key("truncation").null();
  w.key("padding").null();
  w.key("added_tokens").begin_array();
  const char* specials[num_specials] = {"<|pad|>", "<|bos|>", "<|eos|>"};
  for (int i = 0; i < num_specials; ++i) {
    w.begin_object().key("id").value(i).key("content").value(specials[i]).key("single_word").value(false);
    w.key("lstrip").value(false).key("rstrip").value(false).key("normalized").value(false).key("special").value(true);
    w.end_object();
  }
  w.end_array();
  w.key("normalizer").null();
  w.key("pre_tokenizer").begin_object().key("type").value("ByteLevel").key("add_prefix_space").value(false);
  w.key("trim_offsets").value(true).key("use_regex").value(true).end_object();
  w.key("post_processor").null();
  w.key("decoder").begin_object().key("type").value("ByteLevel").key("add_prefix_space").value(false);
  w.key("trim_offsets").value(true).key("use_regex").value(true).end_object();
  w.key("model").begin_object();
  w.key("type").value("BPE").key("dropout").null().key("unk_token").null();
  w.key("continuing_subword_prefix").null().key("end_of_word_suffix").null();
  w.key("fuse_unk").value(false).key("byte_fallback").value(false).key("ignore_merges").value(false);
  w.key("vocab").begin_object();
  for (int i = 0; i < num_specials; ++i) w.key(specials[i]).value(i);
  for (std::size_t id = first_byte_id; id < token_bytes.size(); ++id)
    w.key(byte_level_encode(token_bytes[id])).value(static_cast<std::int64_t>(id));
  w.end_object();
  w.key("merges").begin_array();
  for (const auto& [a, b] : merges)
    w.value(byte_level_encode(token_bytes[static_cast<std::size_t>(a)]) + " " +
            byte_level_encode(token_bytes[static_cast<std::size_t>(b)]));
  w.end_array();
  w.end_object();
  w.end_object();
  return w.str() + "\n";
}

}  // namespace troupe
