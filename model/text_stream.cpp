#include "model/text_stream.hpp"

#include <algorithm>

namespace troupe {

text_stream::text_stream(const tokenizer& tok, std::vector<std::string> stop) : decoder_(tok), stop_(std::move(stop)) {
  for (const auto& s : stop_) hold_ = std::max(hold_, s.empty() ? 0 : s.size() - 1);
}

text_stream::update text_stream::push(std::int32_t id) {
  update u;
  if (stopped_) return u;
  text_ += decoder_.push(id);
  for (const auto& s : stop_) {
    if (s.empty()) continue;
    // A match may straddle the released part by at most s.size() - 1 bytes.
    const auto pos = text_.find(s, emitted_ >= s.size() ? emitted_ - s.size() + 1 : 0);
    if (pos != std::string::npos) {
      text_.resize(pos);
      stopped_ = true;
    }
  }
  std::size_t safe = stopped_ ? text_.size() : (text_.size() > hold_ ? text_.size() - hold_ : 0);
  while (safe > emitted_ && safe < text_.size() && (static_cast<unsigned char>(text_[safe]) & 0xc0) == 0x80) --safe;
  if (safe > emitted_) {
    u.text = text_.substr(emitted_, safe - emitted_);
    emitted_ = safe;
  }
  u.stopped = stopped_;
  return u;
}

std::string text_stream::finish() {
  if (!stopped_) text_ += decoder_.flush();
  std::string rest = text_.substr(std::min(emitted_, text_.size()));
  emitted_ = text_.size();
  return rest;
}

}  // namespace troupe
