#include "tokenizer/tokenizer.hpp"

#include <simdjson.h>

#include <algorithm>
#include <fstream>
#include <limits>
#include <sstream>

#include "protocol/errors.hpp"
#include "tokenizer/byte_level.hpp"

namespace troupe {
namespace {

// The split pattern of GPT-2's ByteLevel pre-tokenizer (use_regex: true).
constexpr const char* gpt2_pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

std::uint64_t pair_key(std::int32_t a, std::int32_t b) {
  return (static_cast<std::uint64_t>(static_cast<std::uint32_t>(a)) << 32) | static_cast<std::uint32_t>(b);
}

std::string base64_decode(std::string_view in, bool& ok) {
  static const auto table = [] {
    std::array<int, 256> t{};
    t.fill(-1);
    const char* chars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    for (int i = 0; i < 64; ++i) t[static_cast<unsigned char>(chars[i])] = i;
    return t;
  }();
  std::string out;
  int val = 0, bits = -8;
  ok = true;
  for (unsigned char c : in) {
    if (c == '=') break;
    if (table[c] < 0) {
      ok = false;
      return out;
    }
    val = (val << 6) | table[c];
    bits += 6;
    if (bits >= 0) {
      out += static_cast<char>((val >> bits) & 0xff);
      bits -= 8;
    }
  }
  return out;
}

[[noreturn]] void fail(const std::string& source, const std::string& what) { throw input_error(source + ": " + what); }

// An optional field: its value, or `fallback` when absent or of another type.
template <class T, class Json>
T field_or(Json e, std::string_view key, T fallback) {
  T v;
  return e[key].get(v) ? fallback : v;
}

}  // namespace

std::size_t complete_utf8_prefix(std::string_view s) {
  // Look back at most 3 bytes for the lead byte of a character that is not yet complete.
  const std::size_t n = s.size();
  for (std::size_t back = 1; back <= std::min<std::size_t>(3, n); ++back) {
    const auto c = static_cast<unsigned char>(s[n - back]);
    if ((c & 0xc0) == 0x80) continue;  // continuation byte: keep looking for the lead
    const std::size_t need = c >= 0xf8 ? 1 : c >= 0xf0 ? 4 : c >= 0xe0 ? 3 : c >= 0xc0 ? 2 : 1;
    return need > back ? n - back : n;
  }
  return n;
}

tokenizer tokenizer::load(const std::filesystem::path& path) {
  tokenizer t;
  t.source_ = path.string();
  {
    std::ifstream in(path, std::ios::binary);
    if (!in) fail(t.source_, "cannot open the tokenizer file");
    std::ostringstream ss;
    ss << in.rdbuf();
    t.file_text_ = ss.str();
  }
  simdjson::dom::parser parser;
  simdjson::padded_string text(t.file_text_);
  simdjson::dom::object root;
  if (auto err = parser.parse(text).get_object().get(root))
    fail(t.source_, std::string("not a JSON object (") + simdjson::error_message(err) + ")");

  auto set_token = [&](std::int32_t id, std::string bytes, bool special) {
    if (id < 0) fail(t.source_, "negative token id");
    if (static_cast<std::size_t>(id) >= t.bytes_.size()) t.bytes_.resize(static_cast<std::size_t>(id) + 1);
    t.bytes_[static_cast<std::size_t>(id)] = bytes;
    if (special) t.specials_.emplace_back(std::move(bytes), id);
    else t.ids_.emplace(std::move(bytes), id);
  };

  std::string_view pat;
  if (!root["bpe_ranks"].error()) {  // tiktoken rank file
    t.ranks_ = rank_kind::by_token_rank;
    t.ignore_merges_ = true;
    if (root["pat_str"].get_string().get(pat)) fail(t.source_, "tiktoken file needs pat_str");
    std::string_view ranks;
    if (root["bpe_ranks"].get_string().get(ranks)) fail(t.source_, "bpe_ranks must be a string");
    // Lines of "<ignored> <first rank> <base64 token> <base64 token> ...", ranks consecutive.
    std::size_t line_start = 0;
    while (line_start < ranks.size()) {
      std::size_t line_end = ranks.find('\n', line_start);
      if (line_end == std::string_view::npos) line_end = ranks.size();
      std::string_view line = ranks.substr(line_start, line_end - line_start);
      line_start = line_end + 1;
      std::vector<std::string_view> fields;
      for (std::size_t p = 0; p < line.size();) {
        std::size_t q = line.find(' ', p);
        if (q == std::string_view::npos) q = line.size();
        if (q > p) fields.push_back(line.substr(p, q - p));
        p = q + 1;
      }
      if (fields.empty()) continue;
      if (fields.size() < 2) fail(t.source_, "bpe_ranks line without a rank");
      std::int64_t rank = 0;
      for (char c : fields[1]) {
        if (c < '0' || c > '9') fail(t.source_, "bpe_ranks: bad rank '" + std::string(fields[1]) + "'");
        rank = rank * 10 + (c - '0');
      }
      for (std::size_t i = 2; i < fields.size(); ++i, ++rank) {
        bool ok;
        std::string bytes = base64_decode(fields[i], ok);
        if (!ok || bytes.empty()) fail(t.source_, "bpe_ranks: bad base64 token at rank " + std::to_string(rank));
        set_token(static_cast<std::int32_t>(rank), std::move(bytes), false);
      }
    }
    simdjson::dom::object specials;
    if (!root["special_tokens"].get_object().get(specials))
      for (auto [k, v] : specials) {
        std::int64_t id;
        if (v.get_int64().get(id)) fail(t.source_, "special_tokens values must be ids");
        set_token(static_cast<std::int32_t>(id), std::string(k), true);
      }
    t.split_ = std::make_unique<pretokenizer>(std::string(pat), pretokenizer::gaps::kept);
  } else {  // Hugging Face tokenizer.json
    simdjson::dom::object model;
    if (root["model"].get_object().get(model)) fail(t.source_, "neither a tokenizer.json (model) nor a tiktoken file (bpe_ranks)");
    std::string_view type;
    if (model["type"].get_string().get(type) || type != "BPE")
      fail(t.source_, "model.type must be \"BPE\" (byte-level BPE is supported)");
    if (field_or(model, "byte_fallback", false)) fail(t.source_, "byte_fallback BPE (SentencePiece style) is not supported; byte-level BPE is");
    t.ignore_merges_ = field_or(model, "ignore_merges", false);
    t.ranks_ = rank_kind::by_merge_list;
    simdjson::dom::object vocab;
    if (model["vocab"].get_object().get(vocab)) fail(t.source_, "model.vocab must be an object");
    for (auto [k, v] : vocab) {
      std::int64_t id;
      if (v.get_int64().get(id)) fail(t.source_, "model.vocab values must be ids");
      auto bytes = byte_level_decode(k);
      if (!bytes) fail(t.source_, "vocab entry '" + std::string(k) + "' is not byte-level text");
      set_token(static_cast<std::int32_t>(id), std::move(*bytes), false);
    }
    simdjson::dom::array merges;
    if (model["merges"].get_array().get(merges)) fail(t.source_, "model.merges must be a list");
    std::int32_t rank = 0;
    for (auto m : merges) {
      std::string left, right;
      std::string_view s;
      simdjson::dom::array pair;
      if (!m.get_string().get(s)) {
        const auto space = s.find(' ');
        if (space == std::string_view::npos) fail(t.source_, "merge '" + std::string(s) + "' is not 'a b'");
        left = std::string(s.substr(0, space));
        right = std::string(s.substr(space + 1));
      } else if (!m.get_array().get(pair) && pair.size() == 2) {
        std::string_view a, b;
        if (pair.at(0).get_string().get(a) || pair.at(1).get_string().get(b)) fail(t.source_, "merges must hold strings");
        left = std::string(a);
        right = std::string(b);
      } else {
        fail(t.source_, "merges must be 'a b' strings or [a, b] pairs");
      }
      auto lb = byte_level_decode(left), rb = byte_level_decode(right);
      if (!lb || !rb) fail(t.source_, "merge '" + left + " " + right + "' is not byte-level text");
      auto li = t.ids_.find(*lb), ri = t.ids_.find(*rb), mi = t.ids_.find(*lb + *rb);
      if (li == t.ids_.end() || ri == t.ids_.end() || mi == t.ids_.end())
        fail(t.source_, "merge '" + left + " " + right + "' names a token missing from the vocab");
      t.merges_.emplace(pair_key(li->second, ri->second), std::make_pair(rank++, mi->second));
    }
    simdjson::dom::array added;
    if (!root["added_tokens"].get_array().get(added))
      for (auto a : added) {
        std::int64_t id;
        std::string_view content;
        if (a["id"].get_int64().get(id) || a["content"].get_string().get(content))
          fail(t.source_, "added_tokens entries need id and content");
        t.ids_.erase(std::string(content));
        set_token(static_cast<std::int32_t>(id), std::string(content), true);
      }
    // Pre-tokenizer: ByteLevel(use_regex) or Sequence[Split(regex), ByteLevel(use_regex: false)].
    std::string pattern;
    bool gaps_kept = true;
    simdjson::dom::element pre;
    std::vector<simdjson::dom::element> steps;
    if (!root["pre_tokenizer"].get(pre) && !pre.is_null()) {
      simdjson::dom::array seq;
      if (!pre["pretokenizers"].get_array().get(seq)) for (auto p : seq) steps.push_back(p);
      else steps.push_back(pre);
    }
    for (auto p : steps) {
      std::string_view ptype;
      if (p["type"].get_string().get(ptype)) fail(t.source_, "pre_tokenizer without a type");
      if (ptype == "ByteLevel") {
        const bool use_regex = field_or(p, "use_regex", true);
        if (field_or(p, "add_prefix_space", false)) fail(t.source_, "ByteLevel add_prefix_space is not supported");
        if (use_regex) {
          if (!pattern.empty()) fail(t.source_, "two split regexes in the pre_tokenizer are not supported");
          pattern = gpt2_pattern;
        }
      } else if (ptype == "Split") {
        std::string_view regex;
        if (p["pattern"]["Regex"].get_string().get(regex)) fail(t.source_, "Split pre_tokenizer needs pattern.Regex");
        const auto behavior = field_or(p, "behavior", std::string_view("Isolated"));
        const bool invert = field_or(p, "invert", false);
        if (!pattern.empty()) fail(t.source_, "two split regexes in the pre_tokenizer are not supported");
        pattern = std::string(regex);
        if (behavior == "Removed" && invert) gaps_kept = false;  // matches are the pieces
        else if (behavior != "Isolated") fail(t.source_, "Split behavior '" + std::string(behavior) + "' is not supported");
      } else {
        fail(t.source_, "pre_tokenizer type '" + std::string(ptype) + "' is not supported");
      }
    }
    if (pattern.empty()) pattern = gpt2_pattern;
    t.split_ = std::make_unique<pretokenizer>(pattern, gaps_kept ? pretokenizer::gaps::kept : pretokenizer::gaps::dropped);
  }
  t.finish_load();
  return t;
}

void tokenizer::finish_load() {
  for (int b = 0; b < 256; ++b) {
    auto it = ids_.find(std::string(1, static_cast<char>(b)));
    if (it == ids_.end()) fail(source_, "byte " + std::to_string(b) + " has no token; byte-level BPE needs all 256");
    byte_ids_[b] = it->second;
  }
  std::sort(specials_.begin(), specials_.end(),
            [](const auto& a, const auto& b) { return a.first.size() > b.first.size(); });
  for (const auto& [text, id] : specials_)
    if (!text.empty()) special_first_byte_[static_cast<unsigned char>(text[0])] = true;
}

std::optional<std::int32_t> tokenizer::special_id(std::string_view text) const {
  for (const auto& [s, id] : specials_)
    if (s == text) return id;
  return std::nullopt;
}

const std::string& tokenizer::token_bytes(std::int32_t id) const {
  if (id < 0 || static_cast<std::size_t>(id) >= bytes_.size())
    throw input_error("token id " + std::to_string(id) + " is outside the tokenizer's vocabulary of " +
                      std::to_string(bytes_.size()));
  return bytes_[static_cast<std::size_t>(id)];
}

void tokenizer::encode_piece(std::string_view piece, std::vector<std::int32_t>& out) const {
  if (ignore_merges_) {
    auto it = ids_.find(std::string(piece));
    if (it != ids_.end()) {
      out.push_back(it->second);
      return;
    }
  }
  // parts[i] = (byte offset, token id); repeatedly merge the adjacent pair of lowest rank,
  // leftmost first, until no pair merges.
  struct part {
    std::uint32_t start;
    std::int32_t id;
  };
  std::vector<part> parts;
  parts.reserve(piece.size() + 1);
  for (std::size_t i = 0; i < piece.size(); ++i)
    parts.push_back({static_cast<std::uint32_t>(i), byte_ids_[static_cast<unsigned char>(piece[i])]});
  const auto end_of = [&](std::size_t i) { return i + 1 < parts.size() ? parts[i + 1].start : piece.size(); };
  std::string scratch;
  const auto rank_of = [&](std::size_t i, std::int32_t& merged) -> std::int64_t {
    if (ranks_ == rank_kind::by_merge_list) {
      auto it = merges_.find(pair_key(parts[i].id, parts[i + 1].id));
      if (it == merges_.end()) return std::numeric_limits<std::int64_t>::max();
      merged = it->second.second;
      return it->second.first;
    }
    scratch.assign(piece.substr(parts[i].start, end_of(i + 1) - parts[i].start));
    auto it = ids_.find(scratch);
    if (it == ids_.end()) return std::numeric_limits<std::int64_t>::max();
    merged = it->second;
    return it->second;  // tiktoken: a token's rank is its id
  };
  while (parts.size() > 1) {
    std::int64_t best = std::numeric_limits<std::int64_t>::max();
    std::size_t best_i = 0;
    std::int32_t best_id = -1;
    for (std::size_t i = 0; i + 1 < parts.size(); ++i) {
      std::int32_t merged = -1;
      const std::int64_t r = rank_of(i, merged);
      if (r < best) {
        best = r;
        best_i = i;
        best_id = merged;
      }
    }
    if (best == std::numeric_limits<std::int64_t>::max()) break;
    parts[best_i].id = best_id;
    parts.erase(parts.begin() + static_cast<std::ptrdiff_t>(best_i) + 1);
  }
  for (const auto& p : parts) out.push_back(p.id);
}

void tokenizer::encode_ordinary(std::string_view text, std::vector<std::int32_t>& out) const {
  std::vector<std::string_view> pieces;
  split_->split_into(text, pieces);
  for (auto p : pieces) encode_piece(p, out);
}

std::vector<std::int32_t> tokenizer::encode(std::string_view text, special_tokens mode) const {
  std::vector<std::int32_t> out;
  if (mode == special_tokens::as_text || specials_.empty()) {
    encode_ordinary(text, out);
    return out;
  }
  std::size_t start = 0;
  for (std::size_t pos = 0; pos < text.size();) {
    const std::pair<std::string, std::int32_t>* hit = nullptr;
    if (special_first_byte_[static_cast<unsigned char>(text[pos])]) {
      for (const auto& sp : specials_)  // longest first
        if (text.compare(pos, sp.first.size(), sp.first) == 0) {
          hit = &sp;
          break;
        }
    }
    if (!hit) {
      ++pos;
      continue;
    }
    encode_ordinary(text.substr(start, pos - start), out);
    out.push_back(hit->second);
    pos += hit->first.size();
    start = pos;
  }
  encode_ordinary(text.substr(start), out);
  return out;
}

std::string tokenizer::decode(const std::vector<std::int32_t>& ids) const {
  std::string out;
  for (auto id : ids) out += token_bytes(id);
  return out;
}

std::string stream_decoder::push(std::int32_t id) {
  pending_ += tok_.token_bytes(id);
  const std::size_t n = complete_utf8_prefix(pending_);
  std::string ready = pending_.substr(0, n);
  pending_.erase(0, n);
  return ready;
}

std::string stream_decoder::flush() {
  std::string rest;
  rest.swap(pending_);
  return rest;
}

}  // namespace troupe
