// Splitting JSON arrays into located elements, and parsing single values with located errors.
#include <algorithm>

#include "data/json_records.h"

namespace qlora::data::detail {
namespace {

bool is_json_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

// A cursor over the content that keeps the line number of its position.
class Cursor {
 public:
  explicit Cursor(std::string_view s) : s_(s) {}

  bool done() const { return pos_ >= s_.size(); }
  char peek() const { return s_[pos_]; }
  size_t pos() const { return pos_; }
  int64_t line() const { return line_; }

  void advance() {
    if (s_[pos_] == '\n') ++line_;
    ++pos_;
  }
  void skip_space() {
    while (!done() && is_json_space(peek())) advance();
  }

 private:
  std::string_view s_;
  size_t pos_ = 0;
  int64_t line_ = 1;
};

// Moves past one element: up to the ',' or ']' that ends it at nesting depth 0. Returns false
// when the content ends first. A stray '}' at depth 0 stays inside the element, for the JSON
// parser to report precisely.
bool skip_element(Cursor& c, int* max_depth) {
  int depth = 0;
  bool in_string = false;
  for (; !c.done(); c.advance()) {
    const char ch = c.peek();
    if (in_string) {
      if (ch == '\\') {
        c.advance();
        if (c.done()) return false;
      } else if (ch == '"') {
        in_string = false;
      }
    } else if (ch == '"') {
      in_string = true;
    } else if (ch == '{' || ch == '[') {
      *max_depth = std::max(*max_depth, ++depth);
    } else if (ch == '}' || ch == ']') {
      if (depth == 0 && ch == ']') return true;
      if (depth > 0) --depth;
    } else if (ch == ',' && depth == 0) {
      return true;
    }
  }
  return false;
}

std::string_view trim_right(std::string_view s) {
  while (!s.empty() && is_json_space(s.back())) s.remove_suffix(1);
  return s;
}

// Depth of the deepest bracket in a JSON text, ignoring brackets inside strings.
int nesting_depth(std::string_view text) {
  int depth = 0, max_depth = 0;
  bool in_string = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char ch = text[i];
    if (in_string) {
      if (ch == '\\')
        ++i;
      else if (ch == '"')
        in_string = false;
    } else if (ch == '"') {
      in_string = true;
    } else if (ch == '{' || ch == '[') {
      max_depth = std::max(max_depth, ++depth);
    } else if ((ch == '}' || ch == ']') && depth > 0) {
      --depth;
    }
  }
  return max_depth;
}

// nlohmann's what() is "[json.exception.parse_error.101] parse error at line 1, column 3:
// syntax error ..."; its line and column count within the snippet we parsed, so we keep only
// the reason and compute the file position ourselves.
std::string error_reason(const nlohmann::json::exception& e) {
  std::string what = e.what();
  const size_t column = what.find("column ");
  const size_t colon = what.find(": ", column == std::string::npos ? 0 : column);
  if (colon != std::string::npos) return what.substr(colon + 2);
  const size_t bracket = what.find("] ");
  return bracket == std::string::npos ? what : what.substr(bracket + 2);
}

std::string too_deep_message() {
  return "JSON nested deeper than " + std::to_string(kMaxJsonDepth) + " levels";
}

}  // namespace

std::vector<JsonElement> scan_json_array(std::string_view content) {
  std::vector<JsonElement> out;
  Cursor c(content);
  c.skip_space();
  if (c.done()) return out;
  if (c.peek() != '[') {
    out.push_back({{}, c.line(), "expected a JSON array of records ('[' ... ']')"});
    return out;
  }
  const int64_t open_line = c.line();
  c.advance();
  bool after_comma = false;
  for (;;) {
    c.skip_space();
    if (c.done()) {
      out.push_back({{}, open_line, "unterminated JSON array: no ']' matches this '['"});
      return out;
    }
    if (c.peek() == ']') {
      if (after_comma) out.push_back({{}, c.line(), "trailing comma before ']'"});
      c.advance();
      break;
    }
    const size_t begin = c.pos();
    const int64_t line = c.line();
    int max_depth = 0;
    const bool closed = skip_element(c, &max_depth);
    const std::string_view text = trim_right(content.substr(begin, c.pos() - begin));
    if (!closed) {
      out.push_back({{}, line, "unterminated JSON array: the last record is cut off"});
      return out;
    }
    if (text.empty()) {
      out.push_back({{}, line, "empty array element (a stray comma?)"});
    } else if (max_depth > kMaxJsonDepth) {
      out.push_back({{}, line, too_deep_message()});
    } else {
      out.push_back({text, line, {}});
    }
    after_comma = c.peek() == ',';
    c.advance();
    if (!after_comma) break;
  }
  c.skip_space();
  if (!c.done()) out.push_back({{}, c.line(), "unexpected content after the closing ']'"});
  return out;
}

bool parse_json_value(std::string_view text, int64_t first_line, IssueSink& sink,
                      nlohmann::json* out) {
  if (nesting_depth(text) > kMaxJsonDepth) {
    sink.report(first_line, too_deep_message());
    return false;
  }
  try {
    *out = nlohmann::json::parse(text.begin(), text.end());
    return true;
  } catch (const nlohmann::json::parse_error& e) {
    // e.byte counts the bytes read, the offending one included.
    const size_t upto = std::min(text.size(), e.byte > 0 ? static_cast<size_t>(e.byte - 1) : 0);
    const auto newlines = std::count(text.begin(), text.begin() + upto, '\n');
    sink.report(first_line + newlines, "invalid JSON: " + error_reason(e));
  } catch (const nlohmann::json::exception& e) {
    sink.report(first_line, "invalid JSON: " + error_reason(e));
  }
  return false;
}

}  // namespace qlora::data::detail
