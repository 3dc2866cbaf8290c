// GPT-2's byte-level alphabet: every byte maps to one printable Unicode character, so BPE
// vocabularies in tokenizer.json can be written as text. Invariant: the map is a bijection on
// all 256 bytes, so decode(encode(bytes)) == bytes for any input, valid UTF-8 or not.
#pragma once

#include <optional>
#include <string>
#include <string_view>

namespace troupe {

/// The UTF-8 text of the character that stands for `byte`.
const std::string& byte_level_char(unsigned char byte);
/// Converts a byte-level token string back to raw bytes; nullopt if a character is not in the
/// byte-level alphabet (added tokens are stored as plain text).
std::optional<std::string> byte_level_decode(std::string_view token);
/// The byte-level text of raw bytes.
std::string byte_level_encode(std::string_view bytes);

}  // namespace troupe
