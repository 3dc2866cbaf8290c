// Byte-level BPE tokenizers loaded from a Hugging Face `tokenizer.json` or a tiktoken rank
// file (the npm `tiktoken` package's JSON: pat_str, special_tokens, bpe_ranks).
// Invariant: decode(encode(text)) == text byte for byte, for any input.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <array>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "tokenizer/pretokenizer.hpp"

namespace troupe {

/// Whether special-token text in the input ("<|endoftext|>") becomes the special id or is
/// encoded as ordinary text (tiktoken's encode_ordinary).
enum class special_tokens : std::uint8_t { as_text, parse };

class tokenizer {
 public:
  /// Loads either format, detected from the JSON's keys. Throws input_error naming the file.
  static tokenizer load(const std::filesystem::path& path);

  std::vector<std::int32_t> encode(std::string_view text, special_tokens mode = special_tokens::as_text) const;
  /// Raw bytes of the ids (may end inside a UTF-8 character).
  std::string decode(const std::vector<std::int32_t>& ids) const;
  /// Raw bytes of one id; throws input_error for an id outside the vocabulary.
  const std::string& token_bytes(std::int32_t id) const;

  /// Number of ids (largest id + 1, specials included).
  std::int64_t vocab_size() const { return static_cast<std::int64_t>(bytes_.size()); }
  std::optional<std::int32_t> special_id(std::string_view text) const;
  const std::string& source() const { return source_; }
  /// The original file's bytes (written into model directories as they are).
  const std::string& file_text() const { return file_text_; }

 private:
  tokenizer() = default;
  void encode_piece(std::string_view piece, std::vector<std::int32_t>& out) const;
  void encode_ordinary(std::string_view text, std::vector<std::int32_t>& out) const;
  void finish_load();

  enum class rank_kind : std::uint8_t { by_token_rank, by_merge_list };

  std::string source_, file_text_;
  rank_kind ranks_ = rank_kind::by_token_rank;
  bool ignore_merges_ = false;  // a piece that is itself a token is emitted whole
  std::unique_ptr<pretokenizer> split_;
  std::vector<std::string> bytes_;                    // id -> bytes ("" for holes)
  std::unordered_map<std::string, std::int32_t> ids_;  // bytes -> id (ordinary tokens)
  std::unordered_map<std::uint64_t, std::pair<std::int32_t, std::int32_t>> merges_;  // (a,b) -> (rank, merged id)
  std::vector<std::pair<std::string, std::int32_t>> specials_;  // longest first
  std::int32_t byte_ids_[256] = {};
  bool special_first_byte_[256] = {};  // fast reject while scanning for specials
};

/// Turns a stream of token ids into text that never ends inside a UTF-8 character: bytes of
/// an incomplete character are held back until the character completes (or flush()).
class stream_decoder {
 public:
  explicit stream_decoder(const tokenizer& tok) : tok_(tok) {}
  /// Text that became complete with this token.
  std::string push(std::int32_t id);
  /// Whatever is held back (invalid or truncated bytes), at the end of a stream.
  std::string flush();

 private:
  const tokenizer& tok_;
  std::string pending_;
};

/// Length of the longest prefix of `bytes` that does not end inside a UTF-8 character (an
/// invalid byte counts as complete, so bad input is passed on rather than stalling).
std::size_t complete_utf8_prefix(std::string_view bytes);

}  // namespace troupe
