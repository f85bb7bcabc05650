// JSON plumbing for the record readers: splitting a JSON array into its elements with line
// numbers, parsing one value with a located error, and checking record fields.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "data/data_internal.h"

namespace qlora::data::detail {

// Records never nest deeply; refusing deep input keeps hostile files cheap to reject.
inline constexpr int kMaxJsonDepth = 256;

// One element of a top-level JSON array, or a structural problem found while scanning.
struct JsonElement {
  std::string_view text;  // the element's bytes (empty when `error` is set)
  int64_t line = 0;       // where it starts (or where the problem is)
  std::string error;      // non-empty: not an element but something wrong with the array
};

// Splits `content` (a top-level JSON array) into its elements without parsing them, so each
// record gets its own line number and a bad one does not take the others with it. Strings and
// escapes are tracked so brackets and commas inside them are ignored; a problem with the array
// itself (not an array, unterminated, trailing garbage, empty element) becomes an element with
// `error` set, in file order.
std::vector<JsonElement> scan_json_array(std::string_view content);

// Parses one JSON value whose first byte is on `first_line`. On failure reports "invalid JSON
// ..." at the exact line of the error and returns false.
bool parse_json_value(std::string_view text, int64_t first_line, IssueSink& sink,
                      nlohmann::json* out);

// Field checks; on failure report at `line` and return false.
bool alpaca_record_from_json(const nlohmann::json& value, int64_t line, IssueSink& sink,
                             Record* out);
bool chat_record_from_json(const nlohmann::json& value, int64_t line, IssueSink& sink, Record* out);

}  // namespace qlora::data::detail
