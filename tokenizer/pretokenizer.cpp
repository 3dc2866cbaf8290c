#define PCRE2_CODE_UNIT_WIDTH 8
#include "tokenizer/pretokenizer.hpp"

#include <pcre2.h>

#include "protocol/errors.hpp"

namespace troupe {

struct pretokenizer::impl {
  pcre2_code* code = nullptr;
  gaps gap_mode;
  ~impl() {
    if (code) pcre2_code_free(code);
  }
};

pretokenizer::pretokenizer(const std::string& pattern, gaps gap_mode) : impl_(std::make_unique<impl>()) {
  impl_->gap_mode = gap_mode;
  int err = 0;
  PCRE2_SIZE offset = 0;
  // UCP: \s, \d, \w and POSIX classes are Unicode-aware, as in the Rust regexes tiktoken and
  // tokenizers use. MATCH_INVALID_UTF: invalid bytes never match and fall into gaps.
  impl_->code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                              PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF, &err, &offset, nullptr);
  if (!impl_->code) {
    PCRE2_UCHAR msg[256];
    pcre2_get_error_message(err, msg, sizeof msg);
    throw input_error("tokenizer split regex rejected at offset " + std::to_string(offset) + ": " +
                      reinterpret_cast<char*>(msg));
  }
  pcre2_jit_compile(impl_->code, PCRE2_JIT_COMPLETE);  // falls back to the interpreter if JIT is unavailable
}

pretokenizer::~pretokenizer() = default;
pretokenizer::pretokenizer(pretokenizer&&) noexcept = default;
pretokenizer& pretokenizer::operator=(pretokenizer&&) noexcept = default;

void pretokenizer::split_into(std::string_view text, std::vector<std::string_view>& out) const {
  pcre2_match_data* md = pcre2_match_data_create_from_pattern(impl_->code, nullptr);
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
  std::size_t pos = 0, gap_start = 0;
  while (pos < text.size()) {
    const int rc = pcre2_match(impl_->code, subject, text.size(), pos, 0, md, nullptr);
    if (rc < 0) break;  // no further match: the rest is a gap
    const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
    std::size_t begin = ov[0], end = ov[1];
    if (end == begin) {  // an empty match: step over one character
      ++end;
      while (end < text.size() && (static_cast<unsigned char>(text[end]) & 0xc0) == 0x80) ++end;
      pos = end;
      continue;
    }
    if (begin > gap_start && impl_->gap_mode == gaps::kept) out.push_back(text.substr(gap_start, begin - gap_start));
    out.push_back(text.substr(begin, end - begin));
    pos = gap_start = end;
  }
  if (gap_start < text.size() && impl_->gap_mode == gaps::kept) out.push_back(text.substr(gap_start));
  pcre2_match_data_free(md);
}

}  // namespace troupe
