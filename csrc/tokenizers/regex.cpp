// Oniguruma patterns on PCRE2 (see regex.h).
#include "tokenizers/regex.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <sstream>
#include <stdexcept>

#include "qlora/tokenizers/tokenizer.h"
#include "tokenizers/unicode.h"
#include "tokenizers/unicode_data.h"

namespace qlora::tokenizers::detail {

namespace {

std::string hex_code_point(char32_t c) {
  std::ostringstream out;
  out << "\\x{" << std::hex << std::uppercase << static_cast<uint32_t>(c) << '}';
  return out.str();
}

template <size_t N>
std::string class_ranges(const unicode_data::Range (&ranges)[N]) {
  std::string out;
  for (const unicode_data::Range& r : ranges) {
    out += hex_code_point(r.first);
    if (r.last != r.first) out += '-' + hex_code_point(r.last);
  }
  return out;
}

// The members, usable inside [...], of the Oniguruma classes that PCRE2 defines differently.
const std::string& letter_items() {
  static const std::string items = "\\p{L}" + class_ranges(unicode_data::kExtraLetters);
  return items;
}
const std::string& number_items() {
  static const std::string items = "\\p{N}" + class_ranges(unicode_data::kExtraNumbers);
  return items;
}
const std::string& word_items() {
  static const std::string items =
      "\\p{L}\\p{M}\\p{Nd}\\p{Pc}" + class_ranges(unicode_data::kExtraWord);
  return items;
}
const std::string& digit_items() {
  static const std::string items = "\\p{Nd}" + class_ranges(unicode_data::kExtraDigits);
  return items;
}

// The escape starting at p[i] (a backslash), with its braced argument if any.
std::string_view escape_at(std::string_view p, size_t i) {
  if (i + 1 >= p.size()) return p.substr(i);
  const char c = p[i + 1];
  if ((c == 'p' || c == 'P' || c == 'x' || c == 'k' || c == 'g') && i + 2 < p.size() &&
      p[i + 2] == '{') {
    const size_t close = p.find('}', i + 3);
    if (close != std::string_view::npos) return p.substr(i, close - i + 1);
  }
  if (c == 'u' && i + 6 <= p.size() &&
      std::all_of(p.begin() + i + 2, p.begin() + i + 6,
                  [](char h) { return std::isxdigit(static_cast<unsigned char>(h)) != 0; })) {
    return p.substr(i, 6);
  }
  // An escaped multi-byte character stays whole.
  return p.substr(i, 1 + utf8_length_at(p, i + 1));
}

// An escape as Oniguruma means it, in PCRE2 syntax (inside or outside a character class).
std::string translate_escape(std::string_view esc, bool in_class) {
  auto set = [in_class](const std::string& items, bool negated) {
    if (in_class) return negated ? std::string() : items;
    return (negated ? "[^" : "[") + items + "]";
  };
  // PCRE2 10.42's \s also matches U+180E, which is no longer White_Space.
  if (esc == "\\s") return "\\p{White_Space}";
  if (esc == "\\S") return "\\P{White_Space}";
  // Oniguruma knows Unicode 16, PCRE2 10.42 Unicode 14: add the letters and digits since.
  if (esc == "\\p{L}" || (esc == "\\P{L}" && !in_class)) return set(letter_items(), esc[1] == 'P');
  if (esc == "\\p{N}" || (esc == "\\P{N}" && !in_class)) return set(number_items(), esc[1] == 'P');
  // Oniguruma's \w also has marks, connectors and some symbols and numbers.
  if (esc == "\\w" || (esc == "\\W" && !in_class)) return set(word_items(), esc[1] == 'W');
  if (esc == "\\d" || (esc == "\\D" && !in_class)) return set(digit_items(), esc[1] == 'D');
  // \h is a hexadecimal digit in Oniguruma, horizontal space in PCRE2.
  if (esc == "\\h" || (esc == "\\H" && !in_class)) return set("0-9a-fA-F", esc[1] == 'H');
  if (esc.size() == 6 && esc[1] == 'u') return "\\x{" + std::string(esc.substr(2)) + "}";
  return std::string(esc);
}

// Per-thread PCRE2 match state; one ovector pair is all these searches read.
struct MatchScratch {
  pcre2_match_data* data = pcre2_match_data_create(1, nullptr);
  pcre2_match_context* context = pcre2_match_context_create(nullptr);
  pcre2_jit_stack* stack = pcre2_jit_stack_create(32 * 1024, 8 * 1024 * 1024, nullptr);
  MatchScratch() {
    if (stack != nullptr) pcre2_jit_stack_assign(context, nullptr, stack);
  }
  ~MatchScratch() {
    pcre2_jit_stack_free(stack);
    pcre2_match_context_free(context);
    pcre2_match_data_free(data);
  }
  MatchScratch(const MatchScratch&) = delete;
  MatchScratch& operator=(const MatchScratch&) = delete;
};

MatchScratch& match_scratch() {
  thread_local MatchScratch scratch;
  return scratch;
}

}  // namespace

// Rewrites a pattern written for Oniguruma (what tokenizer.json holds) for PCRE2.
std::string translate_pattern(std::string_view p) {
  std::string out;
  bool in_class = false;
  for (size_t i = 0; i < p.size();) {
    const char c = p[i];
    if (c == '\\') {
      const std::string_view esc = escape_at(p, i);
      const std::string translated = translate_escape(esc, in_class);
      // A negated class escape inside [...] has no PCRE2 spelling with the extra ranges; the
      // plain one differs only on code points new since Unicode 14.
      out += translated.empty() ? std::string(esc) : translated;
      i += esc.size();
      continue;
    }
    if (!in_class && c == '[') {
      in_class = true;
      out += c;
      ++i;
      if (i < p.size() && p[i] == '^') out += p[i++];
      if (i < p.size() && p[i] == ']') out += p[i++];  // a literal ] first in the class
      continue;
    }
    if (in_class && c == '[' && i + 1 < p.size() && p[i + 1] == ':') {
      const size_t close = p.find(":]", i + 2);
      if (close != std::string_view::npos) {
        out.append(p.substr(i, close + 2 - i));
        i = close + 2;
        continue;
      }
    }
    if (in_class && c == ']') in_class = false;
    out += c;
    ++i;
  }
  return out;
}

Regex::Regex(std::string_view onig_pattern) {
  const std::string pattern = translate_pattern(onig_pattern);
  int error = 0;
  PCRE2_SIZE offset = 0;
  // Oniguruma's Ruby syntax anchors ^ and $ at line breaks.
  pcre2_code* code =
      pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                    PCRE2_UTF | PCRE2_UCP | PCRE2_MULTILINE, &error, &offset, nullptr);
  if (code == nullptr) {
    std::array<PCRE2_UCHAR, 256> message{};
    pcre2_get_error_message(error, message.data(), message.size());
    throw TokenizerError("invalid regex \"" + std::string(onig_pattern) +
                         "\": " + reinterpret_cast<const char*>(message.data()) + " at offset " +
                         std::to_string(offset));
  }
  code_.reset(code, pcre2_code_free);
  jit_ = pcre2_jit_compile(code, PCRE2_JIT_COMPLETE) == 0;
}

std::vector<Span> Regex::find_all(std::string_view text) const {
  std::vector<Span> out;
  size_t pos = 0;
  bool have_last = false;
  size_t last_end = 0;
  while (pos <= text.size()) {
    Span m;
    if (!find_at(text, pos, &m)) break;
    if (m.first == m.second) {
      pos = m.second < text.size() ? m.second + utf8_length_at(text, m.second) : m.second + 1;
      if (have_last && last_end == m.second) continue;
    } else {
      pos = m.second;
    }
    have_last = true;
    last_end = m.second;
    out.push_back(m);
  }
  return out;
}

bool Regex::matches_whole(std::string_view text) const {
  Span m;
  return find_at(text, 0, &m) && m.first == 0 && m.second == text.size();
}

bool Regex::find_at(std::string_view text, size_t start, Span* m) const {
  MatchScratch& s = match_scratch();
  const auto subject = reinterpret_cast<PCRE2_SPTR>(text.data());
  // Callers pass valid UTF-8 only (encode repairs its input first).
  int rc =
      pcre2_match(code_.get(), subject, text.size(), start, PCRE2_NO_UTF_CHECK, s.data, s.context);
  if (rc == PCRE2_ERROR_JIT_STACKLIMIT && jit_) {
    rc = pcre2_match(code_.get(), subject, text.size(), start, PCRE2_NO_UTF_CHECK | PCRE2_NO_JIT,
                     s.data, s.context);
  }
  if (rc == PCRE2_ERROR_NOMATCH) return false;
  if (rc < 0) {  // rc == 0 only says the ovector is short; the whole match is in it
    std::array<PCRE2_UCHAR, 256> message{};
    pcre2_get_error_message(rc, message.data(), message.size());
    throw std::runtime_error(std::string("regex match failed: ") +
                             reinterpret_cast<const char*>(message.data()));
  }
  const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(s.data);
  *m = {ovector[0], ovector[1]};
  return true;
}

// Rust regex's \w, which decides AddedToken::single_word boundaries.
bool is_rust_word_char(char32_t cp) {
  static const Regex word("\\A[\\p{Alphabetic}\\p{M}\\p{Nd}\\p{Pc}\\x{200C}\\x{200D}]\\z");
  std::string s;
  utf8_append(s, cp);
  return word.matches_whole(s);
}

// What tokenizers' ByteLevel pre-tokenizer splits on before mapping bytes (the GPT-2 regex).
const char* const kGpt2Pattern =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";
const char* const kLlama3Pattern =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| "
    "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
const char* const kQwen2Pattern =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| "
    "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

const Regex& gpt2_regex() {
  static const Regex regex(kGpt2Pattern);
  return regex;
}

Pattern parse_pattern(const JsonNode& node) {
  if (const auto s = node.find("String")) return Pattern::literal(s->str());
  if (const auto r = node.find("Regex")) {
    try {
      return Pattern::regex(r->str());
    } catch (const TokenizerError& e) {
      r->fail(e.what());
    }
  }
  node.fail("expected {\"String\": ...} or {\"Regex\": ...}");
}

}  // namespace qlora::tokenizers::detail
