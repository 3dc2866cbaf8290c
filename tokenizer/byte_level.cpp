#include "tokenizer/byte_level.hpp"

#include <array>
#include <unordered_map>

namespace troupe {
namespace {

std::string utf8(char32_t cp) {
  std::string s;
  if (cp < 0x80) {
    s += static_cast<char>(cp);
  } else if (cp < 0x800) {
    s += static_cast<char>(0xc0 | (cp >> 6));
    s += static_cast<char>(0x80 | (cp & 0x3f));
  } else {
    s += static_cast<char>(0xe0 | (cp >> 12));
    s += static_cast<char>(0x80 | ((cp >> 6) & 0x3f));
    s += static_cast<char>(0x80 | (cp & 0x3f));
  }
  return s;
}

struct tables {
  std::array<std::string, 256> to_char;
  std::unordered_map<char32_t, unsigned char> to_byte;
  tables() {
    // Printable Latin-1 bytes stand for themselves; the rest are shifted to U+0100 onwards.
    char32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff);
      const char32_t cp = printable ? static_cast<char32_t>(b) : next++;
      to_char[b] = utf8(cp);
      to_byte[cp] = static_cast<unsigned char>(b);
    }
  }
};

const tables& get() {
  static const tables t;
  return t;
}

}  // namespace

const std::string& byte_level_char(unsigned char byte) { return get().to_char[byte]; }

std::optional<std::string> byte_level_decode(std::string_view token) {
  const auto& t = get();
  std::string out;
  for (std::size_t i = 0; i < token.size();) {
    const auto c = static_cast<unsigned char>(token[i]);
    char32_t cp;
    std::size_t len;
    if (c < 0x80) { cp = c; len = 1; }
    else if ((c & 0xe0) == 0xc0 && i + 1 < token.size()) { cp = ((c & 0x1f) << 6) | (token[i + 1] & 0x3f); len = 2; }
    else if ((c & 0xf0) == 0xe0 && i + 2 < token.size()) {
      cp = ((c & 0x0f) << 12) | ((token[i + 1] & 0x3f) << 6) | (token[i + 2] & 0x3f);
      len = 3;
    } else return std::nullopt;
    auto it = t.to_byte.find(cp);
    if (it == t.to_byte.end()) return std::nullopt;
    out += static_cast<char>(it->second);
    i += len;
  }
  return out;
}

std::string byte_level_encode(std::string_view bytes) {
  std::string out;
  for (unsigned char b : bytes) out += byte_level_char(b);
  return out;
}

}  // namespace troupe
