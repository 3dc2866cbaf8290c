// Turning a stream of generated token ids into streamed text with stop strings: text is
// released as soon as it is final — never half a UTF-8 character, never a prefix of a stop
// string that might still complete — and a stop string ends the stream, excluded from the text.
// Used by generate() and by the gateway for every streamed request.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "tokenizer/tokenizer.hpp"

namespace troupe {

class text_stream {
 public:
  text_stream(const tokenizer& tok, std::vector<std::string> stop);

  struct update {
    std::string text;      // newly final text (may be empty)
    bool stopped = false;  // a stop string appeared: the stream is over
  };
  /// Adds a generated token.
  update push(std::int32_t id);
  /// The end of the stream (EOS or length): whatever was held back.
  std::string finish();
  /// All text released so far.
  const std::string& text() const { return text_; }

 private:
  stream_decoder decoder_;
  std::vector<std::string> stop_;
  std::size_t hold_ = 0;     // bytes that could still start a stop string
  std::string text_;         // everything decoded (up to a stop string)
  std::size_t emitted_ = 0;  // bytes of text_ released
  bool stopped_ = false;
};

}  // namespace troupe
