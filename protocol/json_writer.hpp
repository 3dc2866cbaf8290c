// A minimal streaming JSON writer (objects, arrays, strings, numbers) for the files and
// messages Troupe emits. Parsing is simdjson's job; this only writes.
// Invariant: output is valid JSON when begin/end calls are balanced; strings are escaped.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace troupe {

class json_writer {
 public:
  json_writer& begin_object() { open('{'); return *this; }
  json_writer& end_object() { close('}'); return *this; }
  json_writer& begin_array() { open('['); return *this; }
  json_writer& end_array() { close(']'); return *this; }
  json_writer& key(std::string_view k);
  json_writer& value(std::string_view s);
  json_writer& value(const char* s) { return value(std::string_view(s)); }
  json_writer& value(const std::string& s) { return value(std::string_view(s)); }
  json_writer& value(std::int64_t v);
  json_writer& value(int v) { return value(static_cast<std::int64_t>(v)); }
  json_writer& value(std::uint64_t v);
  json_writer& value(double v);
  json_writer& value(bool v);
  json_writer& null();
  /// Inserts already-serialised JSON as one value.
  json_writer& raw(std::string_view json);

  const std::string& str() const { return out_; }

 private:
  void open(char c);
  void close(char c);
  void separate();

  std::string out_;
  std::vector<bool> first_;  // per open container: no element written yet
  bool after_key_ = false;
};

/// Appends `s` to `out` as a quoted, escaped JSON string; invalid UTF-8 becomes U+FFFD.
void append_json_string(std::string& out, std::string_view s);
/// `s` with every byte that does not start a valid UTF-8 character replaced by U+FFFD.
std::string replace_invalid_utf8(std::string_view s);

}  // namespace troupe
