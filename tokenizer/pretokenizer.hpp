// Splits text into the pieces BPE runs on, with a Unicode regex (PCRE2, JIT-compiled).
// Invariant: with `keep_gaps`, the pieces cover the input exactly (concatenated, they are the
// input), so no byte is ever lost, even in invalid UTF-8.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace troupe {

class pretokenizer {
 public:
  enum class gaps : bool { dropped, kept };

  /// Compiles `pattern` (tiktoken / tokenizer.json syntax). Throws input_error if PCRE2 rejects it.
  pretokenizer(const std::string& pattern, gaps gap_mode);
  ~pretokenizer();
  pretokenizer(pretokenizer&&) noexcept;
  pretokenizer& operator=(pretokenizer&&) noexcept;

  /// Calls `piece(std::string_view)` for each piece of `text` in order.
  template <class F>
  void split(std::string_view text, F&& piece) const {
    std::vector<std::string_view> out;
    split_into(text, out);
    for (auto p : out) piece(p);
  }
  void split_into(std::string_view text, std::vector<std::string_view>& out) const;

 private:
  struct impl;
  std::unique_ptr<impl> impl_;
};

}  // namespace troupe
