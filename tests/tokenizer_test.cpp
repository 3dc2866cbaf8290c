// Tokenizer mechanics on small files written here; the token-for-token check against tiktoken
// and transformers.js on megabytes of real text is tests/reference/check_tokenizers.sh.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "protocol/errors.hpp"
#include "tests/test_support.hpp"
#include "tokenizer/byte_level.hpp"
#include "tokenizer/tokenizer.hpp"

namespace troupe {
namespace fs = std::filesystem;

/// A byte-level tokenizer.json: 256 byte tokens, merges "h e" -> "he", "he l" -> "hel",
/// "Ġ w" -> "Ġw", and a special token.
fs::path write_small_tokenizer(const fs::path& dir) {
  std::string vocab;
  for (int b = 0; b < 256; ++b) {
    std::string key = byte_level_char(static_cast<unsigned char>(b));
    if (key == "\"") key = "\\\"";
    if (key == "\\") key = "\\\\";
    vocab += (b ? "," : "") + std::string("\"") + key + "\":" + std::to_string(b);
  }
  vocab += R"(,"he":256,"hel":257,"Ġw":258)";
  const std::string json = R"({"version":"1.0","added_tokens":[{"id":259,"content":"<|end|>","special":true}],
    "normalizer":null,"pre_tokenizer":{"type":"ByteLevel","add_prefix_space":false,"use_regex":true},
    "decoder":{"type":"ByteLevel"},"model":{"type":"BPE","vocab":{)" + vocab +
                           R"(},"merges":["h e","he l","Ġ w"]}})";
  const auto path = dir / "tokenizer.json";
  std::ofstream(path) << json;
  return path;
}

TEST(tokenizer, byte_level_alphabet_is_a_bijection) {
  std::string all;
  for (int b = 0; b < 256; ++b) all += static_cast<char>(b);
  EXPECT_EQ(byte_level_decode(byte_level_encode(all)), all);
  EXPECT_EQ(byte_level_char(' '), "Ġ");
}

TEST(tokenizer, merges_apply_by_rank) {
  const auto t = tokenizer::load(write_small_tokenizer(test::temp_dir("tok_small")));
  EXPECT_EQ(t.encode("hello world"), (std::vector<std::int32_t>{257, 'l', 'o', 258, 'o', 'r', 'l', 'd'}));
  EXPECT_EQ(t.decode(t.encode("hello world")), "hello world");
  EXPECT_EQ(t.encode("a<|end|>b", special_tokens::parse), (std::vector<std::int32_t>{'a', 259, 'b'}));
  EXPECT_EQ(t.encode("<|end|>").size(), 7u);  // as text by default
}

TEST(tokenizer, round_trips_invalid_utf8_and_streams_whole_characters) {
  const auto t = tokenizer::load(write_small_tokenizer(test::temp_dir("tok_utf8")));
  const std::string text = "caf\xc3\xa9 \xff\xfe ok \xe2\x82\xac";
  const auto ids = t.encode(text);
  EXPECT_EQ(t.decode(ids), text);
  stream_decoder d(t);
  std::string streamed;
  for (auto id : ids) {
    const std::string piece = d.push(id);
    EXPECT_EQ(complete_utf8_prefix(piece), piece.size()) << "a piece ends inside a character";
    streamed += piece;
  }
  streamed += d.flush();
  EXPECT_EQ(streamed, text);
  EXPECT_EQ(complete_utf8_prefix("ab\xe2\x82"), 2u);
  EXPECT_EQ(complete_utf8_prefix("ab\xe2\x82\xac"), 5u);
}

TEST(tokenizer, tiktoken_gpt2_matches_known_ids) {
  const fs::path file = fs::path(TROUPE_SOURCE_DIR) / ".deps/npm/node_modules/tiktoken/encoders/gpt2.json";
  if (!fs::exists(file)) GTEST_SKIP() << "reference data not fetched (scripts/fetch-data.sh)";
  const auto t = tokenizer::load(file);
  EXPECT_EQ(t.encode("Hello world"), (std::vector<std::int32_t>{15496, 995}));
  EXPECT_EQ(t.encode("<|endoftext|>", special_tokens::parse), (std::vector<std::int32_t>{50256}));
  EXPECT_EQ(t.vocab_size(), 50257);
}

TEST(tokenizer, bad_files_give_clear_errors) {
  const auto dir = test::temp_dir("tok_bad");
  std::ofstream(dir / "bad.json") << "{\"model\": {\"type\": \"Unigram\"}}";
  try {
    tokenizer::load(dir / "bad.json");
    FAIL();
  } catch (const input_error& e) {
    EXPECT_NE(std::string(e.what()).find("BPE"), std::string::npos);
  }
  std::ofstream(dir / "trunc.json") << "{\"model\": {\"type\": \"BPE\", \"vocab\": {";
  EXPECT_THROW(tokenizer::load(dir / "trunc.json"), input_error);
  EXPECT_THROW(tokenizer::load(dir / "missing.json"), input_error);
}

}  // namespace troupe
