// Typed, named access to the fields of a JSON object (simdjson DOM) for config files: every
// problem is an input_error naming the file and the field, and says what was expected.
#pragma once

#include <simdjson.h>

#include <cstdint>
#include <string>
#include <string_view>

#include "protocol/errors.hpp"

namespace troupe {

struct json_fields {
  simdjson::dom::object obj;
  const std::string& source;

  [[noreturn]] void fail(std::string_view field, const std::string& what) const {
    throw input_error(source + ": field '" + std::string(field) + "' " + what);
  }
  bool has(std::string_view field) const {
    simdjson::dom::element e;
    return !obj.at_key(field).get(e) && !e.is_null();
  }
  simdjson::dom::element get(std::string_view field) const {
    simdjson::dom::element e;
    if (obj.at_key(field).get(e) || e.is_null()) fail(field, "is missing (required)");
    return e;
  }
  std::int64_t integer(std::string_view field) const {
    simdjson::dom::element e = get(field);
    std::int64_t v;
    if (e.get_int64().get(v)) fail(field, "must be an integer");
    return v;
  }
  std::int64_t positive(std::string_view field) const {
    std::int64_t v = integer(field);
    if (v <= 0) fail(field, "must be positive, got " + std::to_string(v));
    return v;
  }
  std::int64_t integer_or(std::string_view field, std::int64_t fallback) const {
    return has(field) ? integer(field) : fallback;
  }
  double number(std::string_view field) const {
    simdjson::dom::element e = get(field);
    double v;
    if (e.is_int64()) return static_cast<double>(std::int64_t(e));
    if (e.get_double().get(v)) fail(field, "must be a number");
    return v;
  }
  double number_or(std::string_view field, double fallback) const { return has(field) ? number(field) : fallback; }
  bool boolean_or(std::string_view field, bool fallback) const {
    if (!has(field)) return fallback;
    bool v;
    if (get(field).get_bool().get(v)) fail(field, "must be true or false");
    return v;
  }
  std::string string_or(std::string_view field, std::string fallback) const {
    if (!has(field)) return fallback;
    std::string_view v;
    if (get(field).get_string().get(v)) fail(field, "must be a string");
    return std::string(v);
  }
};

}  // namespace troupe
