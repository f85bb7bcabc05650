// Regexes as tokenizer.json writes them (Oniguruma syntax), run on PCRE2: the pattern
// translation, a compiled Regex with Rust regex's iteration, and the literal-or-regex Pattern
// of tokenizers' Split / Replace.
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "tokenizers/json_node.h"

struct pcre2_real_code_8;

namespace qlora::tokenizers::detail {

using Span = std::pair<size_t, size_t>;  // [begin, end) in bytes

// Rewrites a pattern written for Oniguruma (what tokenizer.json holds) for PCRE2: the few
// differences that matter for tokenizer patterns (\s, newer Unicode letters and digits).
std::string translate_pattern(std::string_view p);

class Regex {
 public:
  explicit Regex(std::string_view onig_pattern);

  // Non-overlapping matches, iterated as Rust's regex crate does: an empty match right after
  // the previous match is skipped.
  std::vector<Span> find_all(std::string_view text) const;

  bool matches_whole(std::string_view text) const;

 private:
  bool find_at(std::string_view text, size_t start, Span* m) const;

  std::shared_ptr<pcre2_real_code_8> code_;
  bool jit_ = false;
};

// Rust regex's \w, which decides AddedToken::single_word boundaries.
bool is_rust_word_char(char32_t cp);

// The pre-tokenizer patterns of GPT-2 (tokenizers' ByteLevel), Llama 3 and Qwen2.
extern const char* const kGpt2Pattern;
extern const char* const kLlama3Pattern;
extern const char* const kQwen2Pattern;
const Regex& gpt2_regex();

// A literal or regex pattern (tokenizers' Split / Replace "pattern": {"String"|"Regex": ...}).
class Pattern {
 public:
  static Pattern literal(std::string text) {
    Pattern p;
    p.literal_ = std::move(text);
    return p;
  }
  static Pattern regex(std::string_view onig_pattern) {
    Pattern p;
    p.regex_ = std::make_shared<Regex>(onig_pattern);
    return p;
  }

  std::vector<Span> find_all(std::string_view text) const {
    if (regex_) return regex_->find_all(text);
    std::vector<Span> out;
    if (literal_.empty()) return out;
    for (size_t pos = 0; (pos = text.find(literal_, pos)) != std::string_view::npos;) {
      out.emplace_back(pos, pos + literal_.size());
      pos += literal_.size();
    }
    return out;
  }

  std::string replace_all(std::string_view text, std::string_view with) const {
    std::string out;
    size_t pos = 0;
    for (const Span& m : find_all(text)) {
      out.append(text.substr(pos, m.first - pos));
      out.append(with);
      pos = m.second;
    }
    out.append(text.substr(pos));
    return out;
  }

 private:
  std::string literal_;
  std::shared_ptr<Regex> regex_;
};

// {"String": ...} or {"Regex": ...}; errors name the file and key.
Pattern parse_pattern(const JsonNode& node);

}  // namespace qlora::tokenizers::detail
