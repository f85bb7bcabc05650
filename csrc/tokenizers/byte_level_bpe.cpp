// BPE tokenizers as Hugging Face `tokenizers` (0.23) runs them from a tokenizer.json: added
// tokens, normalizer, pre-tokenizer, BPE model, post-processor and decoder, each reproduced
// step by step so that the ids are identical. Byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM)
// is the main use; byte-fallback BPE (Llama 2 / Mistral conversions) shares the same code.
// Also builds the byte-level tokenizer of a GGUF vocabulary (tokenizer.ggml.model "gpt2").
//
// Regexes run on PCRE2 where tokenizers uses Oniguruma; the few differences that matter for
// these patterns (\s, newer Unicode letters and digits) are translated away, see
// translate_pattern().
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <iterator>
#include <mutex>
#include <nlohmann/json.hpp>
#include <queue>
#include <shared_mutex>
#include <sstream>
#include <unordered_map>
#include <utility>

#include "tokenizers/tokenizer_internal.h"
#include "tokenizers/unicode_data.h"

namespace qlora::tokenizers {
namespace detail {

// ---------------------------------------------------------------------------------------------
// UTF-8

size_t utf8_decode(std::string_view s, size_t i, char32_t* cp) {
  const auto b0 = static_cast<unsigned char>(s[i]);
  if (b0 < 0x80) {
    *cp = b0;
    return 1;
  }
  const size_t n = b0 >= 0xF0 ? 4 : b0 >= 0xE0 ? 3 : 2;
  char32_t c = b0 & (0x3F >> (n - 1));
  for (size_t k = 1; k < n; ++k) c = (c << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
  *cp = c;
  return n;
}

void utf8_append(std::string& out, char32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

namespace {

// Length of the well-formed sequence at s[i] (Unicode table 3-7), or, when it is not one, of
// its maximal subpart: the bytes one U+FFFD replaces.
size_t sequence_length(std::string_view s, size_t i, bool* valid) {
  const auto b0 = static_cast<unsigned char>(s[i]);
  *valid = true;
  if (b0 < 0x80) return 1;
  size_t trail = 0;
  unsigned char lo = 0x80, hi = 0xBF;  // bounds of the first trailing byte
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    trail = 1;
  } else if (b0 == 0xE0) {
    trail = 2, lo = 0xA0;
  } else if ((b0 >= 0xE1 && b0 <= 0xEC) || b0 == 0xEE || b0 == 0xEF) {
    trail = 2;
  } else if (b0 == 0xED) {
    trail = 2, hi = 0x9F;
  } else if (b0 == 0xF0) {
    trail = 3, lo = 0x90;
  } else if (b0 >= 0xF1 && b0 <= 0xF3) {
    trail = 3;
  } else if (b0 == 0xF4) {
    trail = 3, hi = 0x8F;
  } else {
    *valid = false;
    return 1;
  }
  for (size_t k = 1; k <= trail; ++k) {
    const bool first = k == 1;
    if (i + k >= s.size()) {
      *valid = false;
      return k;
    }
    const auto b = static_cast<unsigned char>(s[i + k]);
    if (b < (first ? lo : 0x80) || b > (first ? hi : 0xBF)) {
      *valid = false;
      return k;
    }
  }
  return trail + 1;
}

}  // namespace

bool utf8_valid(std::string_view bytes) {
  bool valid = true;
  for (size_t i = 0; i < bytes.size() && valid;) i += sequence_length(bytes, i, &valid);
  return valid;
}

std::string utf8_lossy(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size());
  for (size_t i = 0; i < bytes.size();) {
    bool valid;
    const size_t n = sequence_length(bytes, i, &valid);
    if (valid) {
      out.append(bytes.substr(i, n));
    } else {
      out += "\xEF\xBF\xBD";
    }
    i += n;
  }
  return out;
}

bool is_white_space(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F ||
         c == 0x3000;
}

}  // namespace detail

namespace {

using detail::AddedToken;
using detail::AddedVocabulary;
using detail::Segment;
using detail::TokenizerConfig;
using detail::utf8_append;
using detail::utf8_decode;
using nlohmann::json;

size_t utf8_length_at(std::string_view s, size_t i) {
  char32_t cp;
  return utf8_decode(s, i, &cp);
}

// Start of the code point that ends at s[end).
size_t utf8_previous(std::string_view s, size_t end) {
  size_t i = end - 1;
  while (i > 0 && (static_cast<unsigned char>(s[i]) & 0xC0) == 0x80) --i;
  return i;
}

bool starts_with(std::string_view s, std::string_view prefix) {
  return s.substr(0, prefix.size()) == prefix;
}

std::string replace_all(std::string_view s, std::string_view from, std::string_view to) {
  std::string out;
  size_t pos = 0;
  for (size_t hit; (hit = s.find(from, pos)) != std::string_view::npos; pos = hit + from.size()) {
    out.append(s.substr(pos, hit - pos));
    out.append(to);
  }
  out.append(s.substr(pos));
  return out;
}

// ---------------------------------------------------------------------------------------------
// Regexes

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

using Span = std::pair<size_t, size_t>;  // [begin, end) in bytes

// A compiled PCRE2 pattern (given in Oniguruma syntax), shared by the copies.
class Regex {
 public:
  explicit Regex(std::string_view onig_pattern) {
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

  // Non-overlapping matches, iterated as Rust's regex crate does: an empty match right after
  // the previous match is skipped.
  std::vector<Span> find_all(std::string_view text) const {
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

  bool matches_whole(std::string_view text) const {
    Span m;
    return find_at(text, 0, &m) && m.first == 0 && m.second == text.size();
  }

 private:
  bool find_at(std::string_view text, size_t start, Span* m) const {
    MatchScratch& s = match_scratch();
    const auto subject = reinterpret_cast<PCRE2_SPTR>(text.data());
    // Callers pass valid UTF-8 only (encode repairs its input first).
    int rc = pcre2_match(code_.get(), subject, text.size(), start, PCRE2_NO_UTF_CHECK, s.data,
                         s.context);
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

  std::shared_ptr<pcre2_code> code_;
  bool jit_ = false;
};

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

}  // namespace

// ---------------------------------------------------------------------------------------------
// Added tokens

namespace detail {

// Byte trie over the token contents; leftmost-longest search as aho-corasick's MatchKind.
struct AddedVocabulary::Trie {
  struct Node {
    std::vector<std::pair<unsigned char, int32_t>> next;
    int32_t token = -1;  // index into tokens_
  };
  std::vector<Node> nodes{1};
  std::array<bool, 256> first_byte{};

  void insert(std::string_view s, int32_t token) {
    if (s.empty()) return;
    int32_t node = 0;
    for (const char ch : s) {
      const auto b = static_cast<unsigned char>(ch);
      node = child_or_add(node, b);
    }
    if (nodes[node].token < 0) nodes[node].token = token;
    first_byte[static_cast<unsigned char>(s[0])] = true;
  }

  int32_t child(int32_t node, unsigned char b) const {
    for (const auto& [byte, next] : nodes[node].next) {
      if (byte == b) return next;
    }
    return -1;
  }

  // The first position >= from where a token starts, with the longest token there.
  bool find(std::string_view s, size_t from, size_t* start, size_t* stop, int32_t* token) const {
    *token = -1;
    for (size_t i = from; i < s.size(); ++i) {
      if (!first_byte[static_cast<unsigned char>(s[i])]) continue;
      int32_t node = 0;
      for (size_t j = i; j < s.size(); ++j) {
        node = child(node, static_cast<unsigned char>(s[j]));
        if (node < 0) break;
        if (nodes[node].token >= 0) *stop = j + 1, *token = nodes[node].token;
      }
      if (*token >= 0) {
        *start = i;
        return true;
      }
    }
    return false;
  }

 private:
  int32_t child_or_add(int32_t node, unsigned char b) {
    const int32_t existing = child(node, b);
    if (existing >= 0) return existing;
    nodes.emplace_back();
    const auto added = static_cast<int32_t>(nodes.size() - 1);
    nodes[node].next.emplace_back(b, added);
    return added;
  }
};

AddedVocabulary::AddedVocabulary()
    : raw_trie_(std::make_unique<Trie>()), normalized_trie_(std::make_unique<Trie>()) {}
AddedVocabulary::~AddedVocabulary() = default;
AddedVocabulary::AddedVocabulary(AddedVocabulary&&) noexcept = default;
AddedVocabulary& AddedVocabulary::operator=(AddedVocabulary&&) noexcept = default;

void AddedVocabulary::build(std::vector<AddedToken> tokens, const Normalizer& normalizer) {
  tokens_.clear();
  by_content_.clear();
  by_id_.clear();
  special_contents_.clear();
  raw_trie_ = std::make_unique<Trie>();
  normalized_trie_ = std::make_unique<Trie>();
  for (AddedToken& token : tokens) {
    if (token.content.empty()) continue;
    // A repeated content updates the token, as AddedVocabulary::add_tokens does.
    const auto [it, inserted] = by_content_.emplace(token.content, tokens_.size());
    if (token.special) special_contents_.insert(token.content);
    if (inserted) {
      tokens_.push_back(std::move(token));
    } else {
      tokens_[it->second] = std::move(token);
    }
  }
  for (size_t i = 0; i < tokens_.size(); ++i) {
    const AddedToken& token = tokens_[i];
    by_id_[token.id] = i;
    if (token.normalized) {
      normalized_trie_->insert(normalizer ? normalizer(token.content) : token.content,
                               static_cast<int32_t>(i));
    } else {
      raw_trie_->insert(token.content, static_cast<int32_t>(i));
    }
  }
}

std::optional<int32_t> AddedVocabulary::token_to_id(std::string_view content) const {
  const auto it = by_content_.find(std::string(content));
  if (it == by_content_.end()) return std::nullopt;
  return tokens_[it->second].id;
}

const AddedToken* AddedVocabulary::find_id(int32_t id) const {
  const auto it = by_id_.find(id);
  return it == by_id_.end() ? nullptr : &tokens_[it->second];
}

bool AddedVocabulary::is_special_content(const std::string& content) const {
  return special_contents_.count(content) != 0;
}

namespace {

bool ends_with_word(std::string_view s) {
  if (s.empty()) return false;
  char32_t cp;
  utf8_decode(s, utf8_previous(s, s.size()), &cp);
  return is_rust_word_char(cp);
}

bool starts_with_word(std::string_view s) {
  if (s.empty()) return false;
  char32_t cp;
  utf8_decode(s, 0, &cp);
  return is_rust_word_char(cp);
}

// Start of the whitespace run that ends s.
size_t trailing_space_start(std::string_view s) {
  size_t i = s.size();
  while (i > 0) {
    const size_t prev = utf8_previous(s, i);
    char32_t cp;
    utf8_decode(s, prev, &cp);
    if (!is_white_space(cp)) break;
    i = prev;
  }
  return i;
}

// Length of the whitespace run that starts s.
size_t leading_space_length(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    char32_t cp;
    const size_t n = utf8_decode(s, i, &cp);
    if (!is_white_space(cp)) break;
    i += n;
  }
  return i;
}

}  // namespace

// AddedVocabulary::find_matches of tokenizers: the splits cover the whole sentence.
std::vector<AddedVocabulary::Match> AddedVocabulary::find_matches(std::string_view sentence,
                                                                  const Trie& trie) const {
  std::vector<Match> splits;
  size_t start_offset = 0;
  size_t search_from = 0;
  size_t start = 0, stop = 0;
  int32_t index = -1;
  while (trie.find(sentence, search_from, &start, &stop, &index)) {
    // The search resumes after the raw match, whatever stripping or rejection follows.
    search_from = stop;
    const AddedToken& token = tokens_[index];
    if (token.single_word) {
      const bool start_space = start == 0 || !ends_with_word(sentence.substr(0, start));
      const bool stop_space = stop == sentence.size() || !starts_with_word(sentence.substr(stop));
      if (!start_space || !stop_space) continue;
    }
    if (token.lstrip)
      start = std::max(trailing_space_start(sentence.substr(0, start)), start_offset);
    if (token.rstrip) stop += leading_space_length(sentence.substr(stop));
    if (start_offset < start) splits.push_back({start_offset, start, -1});
    splits.push_back({start, stop, token.id});
    start_offset = stop;
  }
  if (start_offset < sentence.size()) splits.push_back({start_offset, sentence.size(), -1});
  return splits;
}

std::vector<Segment> AddedVocabulary::split(std::string_view text,
                                            const Normalizer& normalizer) const {
  std::vector<Segment> out;
  auto add_text = [&](std::string_view raw, bool at_origin) {
    const std::string normalized = normalizer ? normalizer(raw) : std::string(raw);
    for (const Match& m : find_matches(normalized, *normalized_trie_)) {
      if (m.id >= 0) {
        out.push_back({m.id, {}, false});
      } else if (m.stop > m.start) {
        out.push_back(
            {-1, normalized.substr(m.start, m.stop - m.start), at_origin && m.start == 0});
      }
    }
  };
  for (const Match& m : find_matches(text, *raw_trie_)) {
    if (m.id >= 0) {
      out.push_back({m.id, {}, false});
    } else if (m.stop > m.start) {
      add_text(text.substr(m.start, m.stop - m.start), m.start == 0);
    }
  }
  return out;
}

}  // namespace detail

namespace {

// ---------------------------------------------------------------------------------------------
// Unicode normalization (NFC / NFD) with tokenizers' tables

constexpr char32_t kHangulBase = 0xAC00, kHangulL = 0x1100, kHangulV = 0x1161, kHangulT = 0x11A7;
constexpr char32_t kHangulVCount = 21, kHangulTCount = 28, kHangulCount = 11172;

uint8_t combining_class(char32_t c) {
  const auto& table = unicode_data::kCombiningClasses;
  const auto it = std::upper_bound(std::begin(table), std::end(table), c,
                                   [](char32_t v, const auto& r) { return v < r.first; });
  if (it == std::begin(table)) return 0;
  const auto& r = *std::prev(it);
  return c <= r.last ? r.ccc : 0;
}

void decompose_into(char32_t c, std::u32string& out) {
  if (c >= kHangulBase && c < kHangulBase + kHangulCount) {
    const char32_t s = c - kHangulBase;
    out += kHangulL + s / (kHangulVCount * kHangulTCount);
    out += kHangulV + (s % (kHangulVCount * kHangulTCount)) / kHangulTCount;
    if (s % kHangulTCount != 0) out += kHangulT + s % kHangulTCount;
    return;
  }
  const auto& table = unicode_data::kDecompositions;
  const auto it = std::lower_bound(std::begin(table), std::end(table), c,
                                   [](const auto& d, char32_t v) { return d.code_point < v; });
  if (it == std::end(table) || it->code_point != c) {
    out += c;
    return;
  }
  out.append(unicode_data::kDecompositionData + it->offset, it->length);
}

std::optional<char32_t> compose_pair(char32_t a, char32_t b) {
  if (a >= kHangulL && a < kHangulL + 19 && b >= kHangulV && b < kHangulV + kHangulVCount) {
    return kHangulBase + ((a - kHangulL) * kHangulVCount + (b - kHangulV)) * kHangulTCount;
  }
  if (a >= kHangulBase && a < kHangulBase + kHangulCount &&
      (a - kHangulBase) % kHangulTCount == 0 && b > kHangulT && b < kHangulT + kHangulTCount) {
    return a + (b - kHangulT);
  }
  const auto& table = unicode_data::kCompositions;
  const auto it = std::lower_bound(
      std::begin(table), std::end(table), std::make_pair(a, b),
      [](const auto& c, const auto& v) { return std::make_pair(c.first, c.second) < v; });
  if (it == std::end(table) || it->first != a || it->second != b) return std::nullopt;
  return it->composite;
}

// NFD: full canonical decomposition, then marks sorted by combining class.
std::u32string canonical_decomposition(std::string_view s) {
  std::u32string out;
  for (size_t i = 0; i < s.size();) {
    char32_t cp;
    i += utf8_decode(s, i, &cp);
    decompose_into(cp, out);
  }
  for (size_t i = 0; i < out.size();) {
    if (combining_class(out[i]) == 0) {
      ++i;
      continue;
    }
    size_t end = i;
    while (end < out.size() && combining_class(out[end]) != 0) ++end;
    std::stable_sort(out.begin() + i, out.begin() + end, [](char32_t x, char32_t y) {
      return combining_class(x) < combining_class(y);
    });
    i = end;
  }
  return out;
}

// The canonical composition algorithm of UAX #15.
void compose(std::u32string& cps) {
  std::u32string out;
  size_t starter = std::u32string::npos;
  uint8_t last_class = 0;
  for (const char32_t c : cps) {
    const uint8_t cc = combining_class(c);
    if (starter != std::u32string::npos) {
      const bool adjacent = out.size() == starter + 1;
      if (adjacent || (last_class != 0 && last_class < cc)) {
        if (const auto composite = compose_pair(out[starter], c)) {
          out[starter] = *composite;
          continue;
        }
      }
    }
    if (cc == 0) starter = out.size();
    out += c;
    last_class = cc;
  }
  cps.swap(out);
}

std::string to_utf8(const std::u32string& cps) {
  std::string out;
  for (const char32_t c : cps) utf8_append(out, c);
  return out;
}

bool all_bytes_below(std::string_view s, unsigned char limit) {
  return std::all_of(s.begin(), s.end(),
                     [limit](char c) { return static_cast<unsigned char>(c) < limit; });
}

std::string nfc(std::string_view s) {
  // Below U+0300 (lead bytes below 0xCC) text is always in NFC: the common case costs a scan.
  if (all_bytes_below(s, 0xCC)) return std::string(s);
  std::u32string cps = canonical_decomposition(s);
  compose(cps);
  return to_utf8(cps);
}

std::string nfd(std::string_view s) {
  if (all_bytes_below(s, 0x80)) return std::string(s);
  return to_utf8(canonical_decomposition(s));
}

// ---------------------------------------------------------------------------------------------
// Byte-level alphabet (GPT-2's bytes_to_unicode)

struct ByteAlphabet {
  std::array<std::string, 256> byte_to_utf8;
  std::vector<int16_t> char_to_byte;  // indexed by code point; -1 outside the alphabet

  ByteAlphabet() : char_to_byte(256 + 256, -1) {
    char32_t extra = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
      const char32_t cp = printable ? static_cast<char32_t>(b) : extra++;
      utf8_append(byte_to_utf8[b], cp);
      char_to_byte[cp] = static_cast<int16_t>(b);
    }
  }
};

const ByteAlphabet& byte_alphabet() {
  static const ByteAlphabet alphabet;
  return alphabet;
}

std::string bytes_to_alphabet(std::string_view bytes) {
  const ByteAlphabet& a = byte_alphabet();
  std::string out;
  out.reserve(bytes.size() * 2);
  for (const char b : bytes) out += a.byte_to_utf8[static_cast<unsigned char>(b)];
  return out;
}

// The bytes a token spells in the alphabet, or nothing when a character lies outside it.
std::optional<std::string> alphabet_to_bytes(std::string_view token) {
  const ByteAlphabet& a = byte_alphabet();
  std::string out;
  for (size_t i = 0; i < token.size();) {
    char32_t cp;
    i += utf8_decode(token, i, &cp);
    if (cp >= a.char_to_byte.size() || a.char_to_byte[cp] < 0) return std::nullopt;
    out += static_cast<char>(a.char_to_byte[cp]);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// JSON with the key path, for error messages naming the file and the key

class JsonNode {
 public:
  JsonNode(const json& value, std::shared_ptr<const std::string> file, std::string path)
      : value_(&value), file_(std::move(file)), path_(std::move(path)) {}

  const json& value() const { return *value_; }

  [[noreturn]] void fail(const std::string& message) const {
    throw TokenizerError(*file_ + ": " + (path_.empty() ? "" : path_ + ": ") + message);
  }

  std::optional<JsonNode> find(const char* key) const {
    if (!value_->is_object()) fail("expected an object");
    const auto it = value_->find(key);
    if (it == value_->end() || it->is_null()) return std::nullopt;
    return child(*it, key);
  }

  JsonNode at(const char* key) const {
    std::optional<JsonNode> node = find(key);
    if (!node) throw TokenizerError(*file_ + ": " + child_path(key) + ": missing");
    return *node;
  }

  size_t size() const {
    if (!value_->is_array()) fail("expected an array");
    return value_->size();
  }

  JsonNode operator[](size_t i) const {
    size();  // checks the type
    return JsonNode((*value_)[i], file_, path_ + "[" + std::to_string(i) + "]");
  }

  std::string str() const {
    if (!value_->is_string()) fail("expected a string");
    return value_->get<std::string>();
  }

  bool boolean() const {
    if (!value_->is_boolean()) fail("expected true or false");
    return value_->get<bool>();
  }

  int64_t integer() const {
    if (!value_->is_number_integer()) fail("expected an integer");
    return value_->get<int64_t>();
  }

  int32_t id() const {
    const int64_t v = integer();
    if (v < 0 || v > INT32_MAX) fail("token id " + std::to_string(v) + " out of range");
    return static_cast<int32_t>(v);
  }

  std::string str_or(const char* key, const std::string& fallback) const {
    const auto node = find(key);
    return node ? node->str() : fallback;
  }
  bool bool_or(const char* key, bool fallback) const {
    const auto node = find(key);
    return node ? node->boolean() : fallback;
  }

  std::string type() const { return at("type").str(); }

 private:
  std::string child_path(const char* key) const { return path_.empty() ? key : path_ + "." + key; }
  JsonNode child(const json& value, const char* key) const {
    return JsonNode(value, file_, child_path(key));
  }

  const json* value_;
  std::shared_ptr<const std::string> file_;
  std::string path_;
};

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw TokenizerError(path + ": cannot open: " + std::strerror(errno));
  std::ostringstream data;
  data << in.rdbuf();
  if (in.bad()) throw TokenizerError(path + ": read failed");
  return data.str();
}

json parse_json_file(const std::string& path) {
  const std::string text = read_file(path);
  try {
    return json::parse(text);
  } catch (const json::parse_error& e) {
    throw TokenizerError(path + ": not valid JSON: " + e.what());
  }
}

// ---------------------------------------------------------------------------------------------
// A literal or regex pattern (tokenizers' Split / Replace "pattern": {"String"|"Regex": ...})

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

// ---------------------------------------------------------------------------------------------
// Normalizers

class TextNormalizer {
 public:
  using Step = std::function<std::string(std::string_view)>;

  void add(Step step) { steps_.push_back(std::move(step)); }
  bool empty() const { return steps_.empty(); }

  std::string operator()(std::string_view text) const {
    std::string s(text);
    for (const Step& step : steps_) s = step(s);
    return s;
  }

 private:
  std::vector<Step> steps_;
};

void parse_normalizer(const JsonNode& node, TextNormalizer& out) {
  const std::string type = node.type();
  if (type == "Sequence") {
    const JsonNode list = node.at("normalizers");
    for (size_t i = 0; i < list.size(); ++i) parse_normalizer(list[i], out);
  } else if (type == "NFC") {
    out.add(nfc);
  } else if (type == "NFD") {
    out.add(nfd);
  } else if (type == "Prepend") {
    out.add([prepend = node.at("prepend").str()](std::string_view s) {
      return s.empty() ? std::string() : prepend + std::string(s);
    });
  } else if (type == "Replace") {
    out.add([pattern = parse_pattern(node.at("pattern")), content = node.at("content").str()](
                std::string_view s) { return pattern.replace_all(s, content); });
  } else {
    node.at("type").fail("normalizer \"" + type +
                         "\" is not supported (NFC, NFD, Prepend, Replace, Sequence)");
  }
}

// ---------------------------------------------------------------------------------------------
// Pre-tokenizers

struct Piece {
  std::string text;
  bool at_origin = false;
};

enum class SplitBehavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

// NormalizedString::split: the pattern's matches and the gaps between them cover the text;
// the behavior decides which spans survive and how delimiters attach.
void split_piece(const Piece& piece, const std::vector<Span>& matches, SplitBehavior behavior,
                 bool invert, std::vector<Piece>& out) {
  std::vector<std::pair<Span, bool>> spans;  // (span, is a match)
  size_t prev = 0;
  for (const Span& m : matches) {
    if (prev != m.first) spans.push_back({{prev, m.first}, invert});
    spans.push_back({m, !invert});
    prev = m.second;
  }
  if (prev != piece.text.size()) spans.push_back({{prev, piece.text.size()}, invert});

  std::vector<std::pair<Span, bool>> kept;  // (span, removed)
  bool previous_match = false;
  switch (behavior) {
    case SplitBehavior::kRemoved:
      kept = spans;
      break;
    case SplitBehavior::kIsolated:
      for (const auto& s : spans) kept.push_back({s.first, false});
      break;
    case SplitBehavior::kContiguous:
      for (const auto& [span, is_match] : spans) {
        if (is_match == previous_match && !kept.empty()) {
          kept.back().first.second = span.second;
        } else {
          kept.push_back({span, false});
        }
        previous_match = is_match;
      }
      break;
    case SplitBehavior::kMergedWithPrevious:
      for (const auto& [span, is_match] : spans) {
        if (is_match && !previous_match && !kept.empty()) {
          kept.back().first.second = span.second;
        } else {
          kept.push_back({span, false});
        }
        previous_match = is_match;
      }
      break;
    case SplitBehavior::kMergedWithNext:
      for (auto it = spans.rbegin(); it != spans.rend(); ++it) {
        const auto& [span, is_match] = *it;
        if (is_match && !previous_match && !kept.empty()) {
          kept.back().first.first = span.first;
        } else {
          kept.push_back({span, false});
        }
        previous_match = is_match;
      }
      std::reverse(kept.begin(), kept.end());
      break;
  }
  for (const auto& [span, removed] : kept) {
    if (removed || span.second == span.first) continue;
    out.push_back({piece.text.substr(span.first, span.second - span.first),
                   piece.at_origin && span.first == 0});
  }
}

class PreTokenizer {
 public:
  using Step = std::function<void(const Piece&, std::vector<Piece>&)>;

  void add(Step step) { steps_.push_back(std::move(step)); }

  std::vector<Piece> run(Piece piece) const {
    std::vector<Piece> pieces{std::move(piece)};
    for (const Step& step : steps_) {
      std::vector<Piece> next;
      for (const Piece& p : pieces) step(p, next);
      pieces.swap(next);
    }
    return pieces;
  }

 private:
  std::vector<Step> steps_;
};

PreTokenizer::Step split_step(Pattern pattern, SplitBehavior behavior, bool invert) {
  return [pattern = std::move(pattern), behavior, invert](const Piece& p, std::vector<Piece>& out) {
    split_piece(p, pattern.find_all(p.text), behavior, invert, out);
  };
}

PreTokenizer::Step byte_level_step(bool add_prefix_space, bool use_regex) {
  return [add_prefix_space, use_regex](const Piece& p, std::vector<Piece>& out) {
    Piece piece = p;
    if (add_prefix_space && !starts_with(piece.text, " ")) piece.text.insert(0, " ");
    const size_t first = out.size();
    if (use_regex) {
      split_piece(piece, gpt2_regex().find_all(piece.text), SplitBehavior::kIsolated, false, out);
    } else {
      out.push_back(std::move(piece));
    }
    for (size_t i = first; i < out.size(); ++i) out[i].text = bytes_to_alphabet(out[i].text);
  };
}

enum class PrependScheme { kAlways, kFirst, kNever };

PrependScheme parse_prepend_scheme(const JsonNode& node) {
  if (const auto scheme = node.find("prepend_scheme")) {
    const std::string s = scheme->str();
    if (s == "always") return PrependScheme::kAlways;
    if (s == "first") return PrependScheme::kFirst;
    if (s == "never") return PrependScheme::kNever;
    scheme->fail("expected \"always\", \"first\" or \"never\"");
  }
  // Files older than prepend_scheme have add_prefix_space.
  return node.bool_or("add_prefix_space", true) ? PrependScheme::kAlways : PrependScheme::kNever;
}

PreTokenizer::Step metaspace_step(std::string replacement, PrependScheme scheme, bool split) {
  return [replacement, scheme, split](const Piece& p, std::vector<Piece>& out) {
    Piece piece{replace_all(p.text, " ", replacement), p.at_origin};
    const bool prepend =
        !starts_with(piece.text, replacement) &&
        (scheme == PrependScheme::kAlways || (scheme == PrependScheme::kFirst && piece.at_origin));
    if (prepend) piece.text.insert(0, replacement);
    if (split) {
      split_piece(piece, Pattern::literal(replacement).find_all(piece.text),
                  SplitBehavior::kMergedWithNext, false, out);
    } else {
      out.push_back(std::move(piece));
    }
  };
}

SplitBehavior parse_behavior(const JsonNode& node) {
  const std::string b = node.str();
  if (b == "Removed") return SplitBehavior::kRemoved;
  if (b == "Isolated") return SplitBehavior::kIsolated;
  if (b == "MergedWithPrevious") return SplitBehavior::kMergedWithPrevious;
  if (b == "MergedWithNext") return SplitBehavior::kMergedWithNext;
  if (b == "Contiguous") return SplitBehavior::kContiguous;
  node.fail("unknown split behavior \"" + b + "\"");
}

std::string single_char(const JsonNode& node) {
  const std::string s = node.str();
  if (s.empty() || utf8_length_at(s, 0) != s.size()) node.fail("expected a single character");
  return s;
}

void parse_pre_tokenizer(const JsonNode& node, PreTokenizer& out) {
  const std::string type = node.type();
  if (type == "Sequence") {
    const JsonNode list = node.at("pretokenizers");
    for (size_t i = 0; i < list.size(); ++i) parse_pre_tokenizer(list[i], out);
  } else if (type == "Split") {
    out.add(split_step(parse_pattern(node.at("pattern")), parse_behavior(node.at("behavior")),
                       node.bool_or("invert", false)));
  } else if (type == "ByteLevel") {
    out.add(
        byte_level_step(node.bool_or("add_prefix_space", true), node.bool_or("use_regex", true)));
  } else if (type == "Digits") {
    // char::is_numeric is \p{N}; each digit is a match of its own.
    out.add(split_step(Pattern::regex("\\p{N}"),
                       node.bool_or("individual_digits", false) ? SplitBehavior::kIsolated
                                                                : SplitBehavior::kContiguous,
                       false));
  } else if (type == "Metaspace") {
    out.add(metaspace_step(single_char(node.at("replacement")), parse_prepend_scheme(node),
                           node.bool_or("split", true)));
  } else {
    node.at("type").fail("pre-tokenizer \"" + type +
                         "\" is not supported (ByteLevel, Split, Digits, Metaspace, Sequence)");
  }
}

// ---------------------------------------------------------------------------------------------
// The BPE model

struct BpeOptions {
  std::optional<std::string> unk_token;
  std::string continuing_subword_prefix;
  std::string end_of_word_suffix;
  bool fuse_unk = false;
  bool byte_fallback = false;
  // Words found whole in the vocabulary skip the merges (Llama 3).
  bool ignore_merges = false;
};

class BpeModel {
 public:
  using Vocab = std::unordered_map<std::string, int32_t>;
  using MergeList = std::vector<std::pair<std::string, std::string>>;
  // Called with the index of the offending merge and the message; does not return.
  using ErrorFn = std::function<void(size_t, const std::string&)>;

  BpeModel() = default;
  BpeModel(Vocab vocab, const MergeList& merges, BpeOptions options, const ErrorFn& error)
      : vocab_(std::move(vocab)), options_(std::move(options)) {
    index_vocab();
    build_merges(merges, error);
    if (options_.unk_token) unk_id_ = token_to_id(*options_.unk_token);
    if (options_.byte_fallback) index_byte_tokens();
  }

  void tokenize(const std::string& word, std::vector<int32_t>& out) const {
    if (word.empty()) return;
    if (options_.ignore_merges) {
      if (const auto it = vocab_.find(word); it != vocab_.end()) {
        out.push_back(it->second);
        return;
      }
    }
    const bool cacheable = word.size() < kMaxCachedWord;
    if (cacheable) {
      std::shared_lock<std::shared_mutex> lock(cache_->mutex);
      if (const auto it = cache_->words.find(word); it != cache_->words.end()) {
        out.insert(out.end(), it->second.begin(), it->second.end());
        return;
      }
    }
    std::vector<int32_t> ids = merge_word(word);
    out.insert(out.end(), ids.begin(), ids.end());
    if (cacheable) {
      std::unique_lock<std::shared_mutex> lock(cache_->mutex);
      if (cache_->words.size() >= kCacheCapacity) cache_->words.clear();
      cache_->words.emplace(word, std::move(ids));
    }
  }

  std::optional<int32_t> token_to_id(std::string_view token) const {
    const auto it = vocab_.find(std::string(token));
    if (it == vocab_.end()) return std::nullopt;
    return it->second;
  }

  const std::string* id_to_token(int32_t id) const {
    if (id < 0 || static_cast<size_t>(id) >= id_to_token_.size()) return nullptr;
    return id_to_token_[id];
  }

  size_t id_count() const { return id_to_token_.size(); }
  size_t vocab_entries() const { return vocab_.size(); }
  std::optional<int32_t> unk_id() const { return unk_id_; }

 private:
  static constexpr size_t kMaxCachedWord = 256;
  static constexpr size_t kCacheCapacity = 200000;

  struct MergeTarget {
    int32_t rank;
    int32_t new_id;
  };
  struct Symbol {
    int32_t id;
    int32_t prev;
    int32_t next;
    size_t len;  // bytes; 0 once merged into its left neighbour
  };
  struct Merge {
    int32_t pos;
    int32_t rank;
    int32_t new_id;
  };
  // Lowest rank first, then leftmost (tokenizers' Merge ordering).
  struct MergeAfter {
    bool operator()(const Merge& a, const Merge& b) const {
      return a.rank != b.rank ? a.rank > b.rank : a.pos > b.pos;
    }
  };
  struct Cache {
    std::shared_mutex mutex;
    std::unordered_map<std::string, std::vector<int32_t>> words;
  };

  static uint64_t pair_key(int32_t a, int32_t b) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
  }

  void index_vocab() {
    int32_t max_id = -1;
    for (const auto& entry : vocab_) max_id = std::max(max_id, entry.second);
    id_to_token_.assign(static_cast<size_t>(max_id + 1), nullptr);
    // Node-based map: the addresses survive moves of the model.
    for (const auto& [token, id] : vocab_) id_to_token_[id] = &token;
  }

  void index_byte_tokens() {
    static const char* const kHex = "0123456789ABCDEF";
    for (int b = 0; b < 256; ++b) {
      const std::string name = std::string("<0x") + kHex[b >> 4] + kHex[b & 15] + ">";
      byte_ids_[b] = token_to_id(name).value_or(-1);
    }
  }

  void build_merges(const MergeList& merges, const ErrorFn& error) {
    merges_.reserve(merges.size());
    const std::string& prefix = options_.continuing_subword_prefix;
    for (size_t rank = 0; rank < merges.size(); ++rank) {
      const auto& [a, b] = merges[rank];
      const auto a_id = token_to_id(a);
      if (!a_id) error(rank, "token \"" + a + "\" is not in the vocabulary");
      const auto b_id = token_to_id(b);
      if (!b_id) error(rank, "token \"" + b + "\" is not in the vocabulary");
      const bool strip = !prefix.empty() && starts_with(b, prefix);
      const std::string merged = a + (strip ? b.substr(prefix.size()) : b);
      const auto new_id = token_to_id(merged);
      if (!new_id) error(rank, "merged token \"" + merged + "\" is not in the vocabulary");
      // A repeated pair keeps its last rank, as tokenizers' HashMap insertion does.
      merges_[pair_key(*a_id, *b_id)] = {static_cast<int32_t>(rank), *new_id};
    }
  }

  // BPE::merge_word: characters (with byte fallback / unk), then Word::merge_all.
  std::vector<int32_t> merge_word(const std::string& word) const {
    std::vector<Symbol> symbols;
    symbols.reserve(word.size());
    size_t unk_len = 0;  // bytes of a pending unknown symbol (0: none)
    for (size_t i = 0; i < word.size();) {
      const size_t len = utf8_length_at(word, i);
      std::string piece = word.substr(i, len);
      if (i > 0) piece.insert(0, options_.continuing_subword_prefix);
      if (i + len == word.size()) piece += options_.end_of_word_suffix;
      i += len;
      if (const auto id = token_to_id(piece)) {
        if (unk_len > 0) add_symbol(symbols, *unk_id_, unk_len), unk_len = 0;
        add_symbol(symbols, *id, len);
      } else if (options_.byte_fallback && add_byte_fallback(piece, symbols)) {
        // (each byte became a symbol)
      } else if (unk_id_) {
        if (unk_len > 0 && !options_.fuse_unk) add_symbol(symbols, *unk_id_, unk_len), unk_len = 0;
        unk_len += len;
      }
      // Without an unknown token, tokenizers drops the character.
    }
    if (unk_len > 0) add_symbol(symbols, *unk_id_, unk_len);
    merge_all(symbols);
    std::vector<int32_t> ids;
    for (const Symbol& s : symbols) {
      if (s.len != 0) ids.push_back(s.id);
    }
    return ids;
  }

  static void add_symbol(std::vector<Symbol>& symbols, int32_t id, size_t len) {
    const auto n = static_cast<int32_t>(symbols.size());
    if (n > 0) symbols.back().next = n;
    symbols.push_back({id, n - 1, -1, len});
  }

  bool add_byte_fallback(const std::string& piece, std::vector<Symbol>& symbols) const {
    for (const char b : piece) {
      if (byte_ids_[static_cast<unsigned char>(b)] < 0) return false;
    }
    for (const char b : piece) add_symbol(symbols, byte_ids_[static_cast<unsigned char>(b)], 1);
    return true;
  }

  const MergeTarget* find_merge(int32_t a, int32_t b) const {
    const auto it = merges_.find(pair_key(a, b));
    return it == merges_.end() ? nullptr : &it->second;
  }

  // Word::merge_all: repeatedly apply the best-ranked merge, leftmost first.
  void merge_all(std::vector<Symbol>& symbols) const {
    std::priority_queue<Merge, std::vector<Merge>, MergeAfter> queue;
    for (size_t i = 0; i + 1 < symbols.size(); ++i) {
      if (const MergeTarget* m = find_merge(symbols[i].id, symbols[i + 1].id)) {
        queue.push({static_cast<int32_t>(i), m->rank, m->new_id});
      }
    }
    while (!queue.empty()) {
      const Merge top = queue.top();
      queue.pop();
      Symbol& current = symbols[top.pos];
      if (current.len == 0 || current.next == -1) continue;
      const int32_t right_pos = current.next;
      const Symbol right = symbols[right_pos];
      // An entry made stale by an earlier merge no longer names this pair.
      const MergeTarget* target = find_merge(current.id, right.id);
      if (target == nullptr || target->new_id != top.new_id) continue;
      current.id = top.new_id;
      current.len += right.len;
      current.next = right.next;
      symbols[right_pos].len = 0;
      if (right.next >= 0) symbols[right.next].prev = top.pos;
      if (current.prev >= 0) {
        if (const MergeTarget* m = find_merge(symbols[current.prev].id, current.id)) {
          queue.push({current.prev, m->rank, m->new_id});
        }
      }
      if (current.next >= 0) {
        if (const MergeTarget* m = find_merge(current.id, symbols[current.next].id)) {
          queue.push({top.pos, m->rank, m->new_id});
        }
      }
    }
  }

  Vocab vocab_;
  std::vector<const std::string*> id_to_token_;
  std::unordered_map<uint64_t, MergeTarget> merges_;
  BpeOptions options_;
  std::optional<int32_t> unk_id_;
  std::array<int32_t, 256> byte_ids_{};
  std::unique_ptr<Cache> cache_ = std::make_unique<Cache>();
};

// ---------------------------------------------------------------------------------------------
// Post-processor: what encode(text, add_special_tokens = true) puts around the ids

struct Template {
  std::vector<int32_t> prefix;
  std::vector<int32_t> suffix;

  // A later processor of a Sequence wraps what the earlier ones produced.
  void wrap(const Template& outer) {
    prefix.insert(prefix.begin(), outer.prefix.begin(), outer.prefix.end());
    suffix.insert(suffix.end(), outer.suffix.begin(), outer.suffix.end());
  }
};

std::vector<int32_t> special_token_ids(const JsonNode& special_tokens, const std::string& name) {
  const JsonNode ids = special_tokens.at(name.c_str()).at("ids");
  std::vector<int32_t> out;
  for (size_t i = 0; i < ids.size(); ++i) out.push_back(ids[i].id());
  return out;
}

// TemplateProcessing's "single" template: special tokens around $A.
Template parse_template(const JsonNode& node) {
  const JsonNode single = node.at("single");
  const auto special_tokens = node.find("special_tokens");
  Template t;
  bool seen_sequence = false;
  for (size_t i = 0; i < single.size(); ++i) {
    const JsonNode item = single[i];
    if (const auto sequence = item.find("Sequence")) {
      if (sequence->at("id").str() != "A" || seen_sequence) {
        sequence->fail("a single-sequence template holds $A once");
      }
      seen_sequence = true;
    } else if (const auto special = item.find("SpecialToken")) {
      if (!special_tokens) node.at("special_tokens").fail("missing");
      const std::vector<int32_t> ids = special_token_ids(*special_tokens, special->at("id").str());
      std::vector<int32_t>& side = seen_sequence ? t.suffix : t.prefix;
      side.insert(side.end(), ids.begin(), ids.end());
    } else {
      item.fail("expected {\"SpecialToken\": ...} or {\"Sequence\": ...}");
    }
  }
  if (!seen_sequence) single.fail("the template has no $A");
  return t;
}

// RobertaProcessing / BertProcessing: "cls": [token, id], "sep": [token, id].
Template parse_cls_sep(const JsonNode& node) {
  Template t;
  t.prefix.push_back(node.at("cls")[1].id());
  t.suffix.push_back(node.at("sep")[1].id());
  return t;
}

void parse_post_processor(const JsonNode& node, Template& out) {
  const std::string type = node.type();
  if (type == "Sequence") {
    const JsonNode list = node.at("processors");
    for (size_t i = 0; i < list.size(); ++i) parse_post_processor(list[i], out);
  } else if (type == "TemplateProcessing") {
    out.wrap(parse_template(node));
  } else if (type == "RobertaProcessing" || type == "BertProcessing") {
    out.wrap(parse_cls_sep(node));
  } else if (type != "ByteLevel") {  // ByteLevel only trims offsets
    node.at("type").fail("post-processor \"" + type +
                         "\" is not supported (TemplateProcessing, ByteLevel, RobertaProcessing, "
                         "BertProcessing, Sequence)");
  }
}

// ---------------------------------------------------------------------------------------------
// Decoders: token strings to text, each step rewriting the list of tokens

class TokenDecoder {
 public:
  using Tokens = std::vector<std::string>;
  using Step = std::function<Tokens(Tokens)>;

  void add(Step step) {
    steps_.push_back(std::move(step));
    present_ = true;
  }
  void mark_present() { present_ = true; }

  std::string operator()(Tokens tokens) const {
    if (!present_) return join(tokens, " ");  // tokenizers without a decoder
    for (const Step& step : steps_) tokens = step(std::move(tokens));
    return join(tokens, "");
  }

 private:
  static std::string join(const Tokens& tokens, const char* separator) {
    std::string out;
    for (size_t i = 0; i < tokens.size(); ++i) {
      if (i > 0) out += separator;
      out += tokens[i];
    }
    return out;
  }

  std::vector<Step> steps_;
  bool present_ = false;
};

TokenDecoder::Tokens decode_byte_level(TokenDecoder::Tokens tokens) {
  std::string bytes;
  for (const std::string& token : tokens) {
    // A token with characters outside the alphabet (an added token) is kept as written.
    const std::optional<std::string> b = alphabet_to_bytes(token);
    bytes += b ? *b : token;
  }
  return {detail::utf8_lossy(bytes)};
}

int hex_digit(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// "<0xAB>" as ByteFallback reads it (u8::from_str_radix, which also takes "+A").
std::optional<unsigned char> byte_token_value(const std::string& token) {
  if (token.size() != 6 || !starts_with(token, "<0x") || token[5] != '>') return std::nullopt;
  const int hi = hex_digit(token[3]), lo = hex_digit(token[4]);
  if (token[3] == '+' && lo >= 0) return static_cast<unsigned char>(lo);
  if (hi < 0 || lo < 0) return std::nullopt;
  return static_cast<unsigned char>(hi * 16 + lo);
}

TokenDecoder::Tokens decode_byte_fallback(TokenDecoder::Tokens tokens) {
  TokenDecoder::Tokens out;
  std::string pending;  // bytes of consecutive <0xXX> tokens
  auto flush = [&]() {
    if (pending.empty()) return;
    if (detail::utf8_valid(pending)) {
      out.push_back(pending);
    } else {
      // Invalid bytes become one U+FFFD each, not one per invalid sequence.
      for (size_t i = 0; i < pending.size(); ++i) out.emplace_back("\xEF\xBF\xBD");
    }
    pending.clear();
  };
  for (std::string& token : tokens) {
    if (const auto b = byte_token_value(token)) {
      pending += static_cast<char>(*b);
    } else {
      flush();
      out.push_back(std::move(token));
    }
  }
  flush();
  return out;
}

TokenDecoder::Step strip_step(std::string content, size_t start, size_t stop) {
  return [content, start, stop](TokenDecoder::Tokens tokens) {
    for (std::string& token : tokens) {
      size_t begin = 0, end = token.size();
      for (size_t i = 0; i < start && starts_with(token.substr(begin), content); ++i) {
        begin += content.size();
      }
      for (size_t i = 0; i < stop && end >= begin + content.size() &&
                         token.compare(end - content.size(), content.size(), content) == 0;
           ++i) {
        end -= content.size();
      }
      token = token.substr(begin, end - begin);
    }
    return tokens;
  };
}

TokenDecoder::Step metaspace_decode_step(std::string replacement, PrependScheme scheme) {
  return [replacement, scheme](TokenDecoder::Tokens tokens) {
    for (size_t i = 0; i < tokens.size(); ++i) {
      // In the first token every replacement goes, not only the prepended one.
      const bool drop = i == 0 && scheme != PrependScheme::kNever;
      tokens[i] = replace_all(tokens[i], replacement, drop ? "" : " ");
    }
    return tokens;
  };
}

void parse_decoder(const JsonNode& node, TokenDecoder& out) {
  const std::string type = node.type();
  out.mark_present();
  if (type == "Sequence") {
    const JsonNode list = node.at("decoders");
    for (size_t i = 0; i < list.size(); ++i) parse_decoder(list[i], out);
  } else if (type == "ByteLevel") {
    out.add(decode_byte_level);
  } else if (type == "ByteFallback") {
    out.add(decode_byte_fallback);
  } else if (type == "Fuse") {
    out.add([](TokenDecoder::Tokens tokens) {
      std::string all;
      for (const std::string& t : tokens) all += t;
      return TokenDecoder::Tokens{all};
    });
  } else if (type == "Replace") {
    out.add([pattern = parse_pattern(node.at("pattern")),
             content = node.at("content").str()](TokenDecoder::Tokens tokens) {
      for (std::string& t : tokens) t = pattern.replace_all(t, content);
      return tokens;
    });
  } else if (type == "Strip") {
    const auto count = [&node](const char* key) {
      const int64_t v = node.at(key).integer();
      if (v < 0) node.at(key).fail("expected a non-negative integer");
      return static_cast<size_t>(v);
    };
    out.add(strip_step(single_char(node.at("content")), count("start"), count("stop")));
  } else if (type == "Metaspace") {
    out.add(metaspace_decode_step(single_char(node.at("replacement")), parse_prepend_scheme(node)));
  } else {
    node.at("type").fail("decoder \"" + type +
                         "\" is not supported (ByteLevel, ByteFallback, Fuse, Replace, Strip, "
                         "Metaspace, Sequence)");
  }
}

// ---------------------------------------------------------------------------------------------
// The tokenizer

struct SpecialIds {
  std::optional<int32_t> bos, eos, pad, unk;
};

struct HfParts {
  TextNormalizer normalizer;
  std::vector<AddedToken> added_tokens;
  PreTokenizer pre_tokenizer;
  BpeModel model;
  Template post;
  TokenDecoder decoder;
  SpecialIds special;
};

class HfTokenizer final : public Tokenizer {
 public:
  explicit HfTokenizer(HfParts parts) : parts_(std::move(parts)) {
    if (!parts_.normalizer.empty()) {
      normalize_ = [this](std::string_view s) { return parts_.normalizer(s); };
    }
    added_.build(std::move(parts_.added_tokens), normalize_);
    vocab_size_ = parts_.model.id_count();
    for (const AddedToken& t : added_.tokens()) {
      vocab_size_ = std::max(vocab_size_, static_cast<size_t>(t.id) + 1);
    }
  }

  std::vector<int32_t> encode(std::string_view text, bool add_special_tokens) const override {
    std::string repaired;
    if (!detail::utf8_valid(text)) text = repaired = detail::utf8_lossy(text);
    std::vector<int32_t> ids;
    if (add_special_tokens) ids = parts_.post.prefix;
    for (Segment& segment : added_.split(text, normalize_)) {
      if (segment.id >= 0) {
        ids.push_back(segment.id);
        continue;
      }
      for (const Piece& piece :
           parts_.pre_tokenizer.run({std::move(segment.text), segment.at_origin})) {
        parts_.model.tokenize(piece.text, ids);
      }
    }
    if (add_special_tokens)
      ids.insert(ids.end(), parts_.post.suffix.begin(), parts_.post.suffix.end());
    return ids;
  }

  std::string decode(const std::vector<int32_t>& ids, bool skip_special_tokens) const override {
    TokenDecoder::Tokens tokens;
    for (const int32_t id : ids) {
      const std::string* token = token_text(id);
      if (token == nullptr) continue;
      if (skip_special_tokens && added_.is_special_content(*token)) continue;
      tokens.push_back(*token);
    }
    return parts_.decoder(std::move(tokens));
  }

  size_t vocab_size() const override { return vocab_size_; }

  std::optional<int32_t> token_to_id(std::string_view token) const override {
    if (const auto id = added_.token_to_id(token)) return id;
    return parts_.model.token_to_id(token);
  }

  std::optional<std::string> id_to_token(int32_t id) const override {
    const std::string* token = token_text(id);
    if (token == nullptr) return std::nullopt;
    return *token;
  }

  std::optional<int32_t> bos_id() const override { return parts_.special.bos; }
  std::optional<int32_t> eos_id() const override { return parts_.special.eos; }
  std::optional<int32_t> pad_id() const override { return parts_.special.pad; }
  std::optional<int32_t> unk_id() const override { return parts_.special.unk; }
  bool add_bos() const override { return !parts_.post.prefix.empty(); }
  bool add_eos() const override { return !parts_.post.suffix.empty(); }

  bool is_special(int32_t id) const override {
    const AddedToken* token = added_.find_id(id);
    return token != nullptr && token->special;
  }

 private:
  const std::string* token_text(int32_t id) const {
    if (const AddedToken* t = added_.find_id(id)) return &t->content;
    return parts_.model.id_to_token(id);
  }

  HfParts parts_;
  detail::Normalizer normalize_;
  AddedVocabulary added_;
  size_t vocab_size_ = 0;
};

// ---------------------------------------------------------------------------------------------
// tokenizer.json

BpeModel::MergeList parse_merges(const JsonNode& merges, std::vector<size_t>* json_index) {
  BpeModel::MergeList out;
  for (size_t i = 0; i < merges.size(); ++i) {
    const JsonNode m = merges[i];
    if (m.value().is_string()) {
      const std::string line = m.str();
      if (starts_with(line, "#version")) continue;
      const size_t space = line.find(' ');
      if (space == std::string::npos || line.find(' ', space + 1) != std::string::npos) {
        m.fail("expected \"left right\" (two tokens separated by one space)");
      }
      out.emplace_back(line.substr(0, space), line.substr(space + 1));
    } else if (m.value().is_array() && m.size() == 2) {
      out.emplace_back(m[0].str(), m[1].str());
    } else {
      m.fail("expected \"left right\" or [\"left\", \"right\"]");
    }
    json_index->push_back(i);
  }
  return out;
}

std::optional<std::string> optional_string(const JsonNode& node, const char* key) {
  const auto v = node.find(key);
  if (!v) return std::nullopt;
  return v->str();
}

BpeModel parse_bpe_model(const JsonNode& node) {
  const std::string type = node.str_or("type", "BPE");
  if (type != "BPE") node.at("type").fail("model \"" + type + "\" is not supported (BPE)");
  BpeModel::Vocab vocab;
  const JsonNode vocab_node = node.at("vocab");
  if (!vocab_node.value().is_object()) vocab_node.fail("expected an object {token: id}");
  for (const auto& [token, id] : vocab_node.value().items()) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > INT32_MAX) {
      vocab_node.fail("\"" + token + "\": expected a non-negative integer id");
    }
    vocab[token] = id.get<int32_t>();
  }
  BpeOptions options;
  options.unk_token = optional_string(node, "unk_token");
  options.continuing_subword_prefix =
      optional_string(node, "continuing_subword_prefix").value_or("");
  options.end_of_word_suffix = optional_string(node, "end_of_word_suffix").value_or("");
  options.fuse_unk = node.bool_or("fuse_unk", false);
  options.byte_fallback = node.bool_or("byte_fallback", false);
  options.ignore_merges = node.bool_or("ignore_merges", false);
  // "dropout" only randomizes training-time segmentation; encoding here is deterministic.

  std::vector<size_t> json_index;
  BpeModel::MergeList merges;
  std::optional<JsonNode> merges_node = node.find("merges");
  if (merges_node) merges = parse_merges(*merges_node, &json_index);
  const auto error = [&](size_t rank, const std::string& message) {
    (*merges_node)[json_index[rank]].fail(message);
  };
  return BpeModel(std::move(vocab), merges, std::move(options), error);
}

// The id tokenizers gives an added token, whatever the file's "id" says (it only warns when
// they differ): the id the content already has, else the next id after the vocabulary.
class AddedIdAssigner {
 public:
  explicit AddedIdAssigner(const BpeModel& model) : model_(model) {}

  int32_t assign(const std::string& content) {
    if (const auto it = assigned_.find(content); it != assigned_.end()) return it->second;
    std::optional<int32_t> id = model_.token_to_id(content);
    if (!id) {
      const auto size = static_cast<int64_t>(model_.vocab_entries());
      id = static_cast<int32_t>(max_id_ < 0                      ? size
                                : (max_id_ >= size || size == 0) ? max_id_ + 1
                                                                 : size);
    }
    assigned_[content] = *id;
    max_id_ = std::max<int64_t>(max_id_, *id);
    return *id;
  }

 private:
  const BpeModel& model_;
  std::unordered_map<std::string, int32_t> assigned_;
  int64_t max_id_ = -1;
};

std::vector<AddedToken> parse_added_tokens(const JsonNode& list, const BpeModel& model) {
  std::vector<AddedToken> out;
  AddedIdAssigner ids(model);
  for (size_t i = 0; i < list.size(); ++i) {
    const JsonNode node = list[i];
    AddedToken t;
    t.content = node.at("content").str();
    t.special = node.bool_or("special", false);
    t.single_word = node.bool_or("single_word", false);
    t.lstrip = node.bool_or("lstrip", false);
    t.rstrip = node.bool_or("rstrip", false);
    t.normalized = node.bool_or("normalized", !t.special);
    node.at("id").id();  // required, though tokenizers derives the id itself
    t.id = ids.assign(t.content);
    out.push_back(std::move(t));
  }
  return out;
}

std::string directory_of(const std::string& path) {
  const size_t slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

std::optional<std::string> config_token(const JsonNode& root, const char* key) {
  const auto node = root.find(key);
  if (!node) return std::nullopt;
  if (node->value().is_string()) return node->str();
  return node->at("content").str();  // {"content": ..., "__type": "AddedToken"}
}

// Special ids from tokenizer_config.json, else from the template and the model. Its
// add_bos_token / add_eos_token are ignored, as transformers 5 ignores them whenever a
// tokenizer.json exists: the file's post-processor decides.
void apply_config(const JsonNode& root, const std::optional<TokenizerConfig>& config,
                  HfParts& parts) {
  auto id_of = [&parts](const std::optional<std::string>& token) -> std::optional<int32_t> {
    if (!token) return std::nullopt;
    // Added tokens first, the last of a repeated content winning, as in the tokenizer.
    for (auto it = parts.added_tokens.rbegin(); it != parts.added_tokens.rend(); ++it) {
      if (it->content == *token) return it->id;
    }
    return parts.model.token_to_id(*token);
  };
  SpecialIds& s = parts.special;
  if (config) {
    s.bos = id_of(config->bos);
    s.eos = id_of(config->eos);
    s.pad = id_of(config->pad);
    s.unk = id_of(config->unk);
  }
  if (!s.bos && !parts.post.prefix.empty()) s.bos = parts.post.prefix.front();
  if (!s.eos && !parts.post.suffix.empty()) s.eos = parts.post.suffix.back();
  if (!s.unk) s.unk = parts.model.unk_id();
  if (!s.pad) {
    if (const auto padding = root.find("padding")) {
      if (const auto pad_id = padding->find("pad_id")) s.pad = pad_id->id();
    }
  }
}

// ---------------------------------------------------------------------------------------------
// GGUF vocabulary, tokenizer.ggml.model "gpt2"

[[noreturn]] void vocab_error(const std::string& key, const std::string& message) {
  throw TokenizerError("GGUF vocab: " + key + ": " + message);
}

void check_id(const std::optional<int32_t>& id, size_t n, const char* key) {
  if (id && (*id < 0 || static_cast<size_t>(*id) >= n)) {
    vocab_error(key,
                "id " + std::to_string(*id) + " is not below the " + std::to_string(n) + " tokens");
  }
}

// What Hugging Face's tokenizer.json has for the model family that tokenizer.ggml.pre names.
void configure_pre(const std::string& pre, HfParts& parts, BpeOptions& options) {
  auto in = [&pre](std::initializer_list<const char*> names) {
    return std::any_of(names.begin(), names.end(), [&pre](const char* n) { return pre == n; });
  };
  if (in({"llama3", "llama-v3", "llama-bpe", "falcon3"})) {
    parts.pre_tokenizer.add(
        split_step(Pattern::regex(kLlama3Pattern), SplitBehavior::kIsolated, false));
    parts.pre_tokenizer.add(byte_level_step(false, false));
    options.ignore_merges = true;
  } else if (in({"qwen2"})) {
    parts.normalizer.add(nfc);
    parts.pre_tokenizer.add(
        split_step(Pattern::regex(kQwen2Pattern), SplitBehavior::kIsolated, false));
    parts.pre_tokenizer.add(byte_level_step(false, false));
  } else if (in({"smollm", "starcoder", "refact"})) {
    parts.pre_tokenizer.add(split_step(Pattern::regex("\\p{N}"), SplitBehavior::kIsolated, false));
    parts.pre_tokenizer.add(byte_level_step(false, true));
  } else if (in({"gpt-2", "phi-2", "default", ""})) {
    parts.pre_tokenizer.add(byte_level_step(false, true));
  } else {
    vocab_error("tokenizer.ggml.pre",
                "\"" + pre +
                    "\" is not supported (llama-bpe, llama3, llama-v3, falcon3, qwen2, smollm, "
                    "starcoder, refact, gpt-2, phi-2, default)");
  }
}

BpeModel::MergeList gguf_merges(const std::vector<std::string>& merges) {
  BpeModel::MergeList out;
  out.reserve(merges.size());
  for (size_t i = 0; i < merges.size(); ++i) {
    // Split at the first space after the first character, as llama.cpp does.
    const size_t space = merges[i].find(' ', 1);
    if (space == std::string::npos) {
      vocab_error("tokenizer.ggml.merges[" + std::to_string(i) + "]", "expected \"left right\"");
    }
    out.emplace_back(merges[i].substr(0, space), merges[i].substr(space + 1));
  }
  return out;
}

int32_t token_type(const VocabSpec& spec, size_t i) {
  return spec.token_types.empty() ? static_cast<int32_t>(GgufTokenType::kNormal)
                                  : spec.token_types[i];
}

}  // namespace

namespace detail {

std::optional<TokenizerConfig> read_tokenizer_config(const std::string& tokenizer_file) {
  const std::string path = directory_of(tokenizer_file) + "/tokenizer_config.json";
  std::ifstream probe(path);
  if (!probe) return std::nullopt;
  const json doc = parse_json_file(path);
  const JsonNode root(doc, std::make_shared<const std::string>(path), "");
  if (!doc.is_object()) root.fail("expected a JSON object");
  TokenizerConfig config;
  config.bos = config_token(root, "bos_token");
  config.eos = config_token(root, "eos_token");
  config.pad = config_token(root, "pad_token");
  config.unk = config_token(root, "unk_token");
  if (const auto b = root.find("add_bos_token")) config.add_bos = b->boolean();
  if (const auto e = root.find("add_eos_token")) config.add_eos = e->boolean();
  return config;
}

std::unique_ptr<Tokenizer> byte_level_from_vocab(const VocabSpec& spec) {
  const size_t n = spec.tokens.size();
  if (n == 0) vocab_error("tokenizer.ggml.tokens", "empty");
  if (!spec.token_types.empty() && spec.token_types.size() != n) {
    vocab_error("tokenizer.ggml.token_type", std::to_string(spec.token_types.size()) +
                                                 " entries for " + std::to_string(n) + " tokens");
  }
  check_id(spec.bos_id, n, "tokenizer.ggml.bos_token_id");
  check_id(spec.eos_id, n, "tokenizer.ggml.eos_token_id");
  check_id(spec.unk_id, n, "tokenizer.ggml.unknown_token_id");
  check_id(spec.pad_id, n, "tokenizer.ggml.padding_token_id");

  HfParts parts;
  BpeOptions options;
  configure_pre(spec.pre, parts, options);
  BpeModel::Vocab vocab;
  for (size_t i = 0; i < n; ++i) {
    if (spec.tokens[i].empty()) continue;
    vocab[spec.tokens[i]] = static_cast<int32_t>(i);
    const auto type = static_cast<GgufTokenType>(token_type(spec, i));
    if (type == GgufTokenType::kControl || type == GgufTokenType::kUnknown ||
        type == GgufTokenType::kUserDefined) {
      AddedToken t;
      t.content = spec.tokens[i];
      t.id = static_cast<int32_t>(i);
      t.special = type != GgufTokenType::kUserDefined;
      parts.added_tokens.push_back(std::move(t));
    }
  }
  const auto error = [](size_t rank, const std::string& message) {
    vocab_error("tokenizer.ggml.merges[" + std::to_string(rank) + "]", message);
  };
  parts.model = BpeModel(std::move(vocab), gguf_merges(spec.merges), options, error);
  if (spec.add_bos && spec.bos_id) parts.post.prefix.push_back(*spec.bos_id);
  if (spec.add_eos && spec.eos_id) parts.post.suffix.push_back(*spec.eos_id);
  parts.decoder.add(decode_byte_level);
  parts.special = {spec.bos_id, spec.eos_id, spec.pad_id, spec.unk_id};
  return std::make_unique<HfTokenizer>(std::move(parts));
}

}  // namespace detail

std::unique_ptr<Tokenizer> load_tokenizer_json(const std::string& path) {
  const json doc = parse_json_file(path);
  const JsonNode root(doc, std::make_shared<const std::string>(path), "");
  if (!doc.is_object()) root.fail("expected a JSON object");
  HfParts parts;
  if (const auto n = root.find("normalizer")) parse_normalizer(*n, parts.normalizer);
  if (const auto p = root.find("pre_tokenizer")) parse_pre_tokenizer(*p, parts.pre_tokenizer);
  parts.model = parse_bpe_model(root.at("model"));
  if (const auto a = root.find("added_tokens"))
    parts.added_tokens = parse_added_tokens(*a, parts.model);
  if (const auto p = root.find("post_processor")) parse_post_processor(*p, parts.post);
  if (const auto d = root.find("decoder")) parse_decoder(*d, parts.decoder);
  apply_config(root, detail::read_tokenizer_config(path), parts);
  return std::make_unique<HfTokenizer>(std::move(parts));
}

std::unique_ptr<Tokenizer> tokenizer_from_vocab(const VocabSpec& spec) {
  if (spec.model == "gpt2") return detail::byte_level_from_vocab(spec);
  if (spec.model == "llama") return detail::sentencepiece_from_vocab(spec);
  throw TokenizerError("GGUF vocab: tokenizer.ggml.model: \"" + spec.model +
                       "\" is not supported (\"gpt2\" or \"llama\")");
}

}  // namespace qlora::tokenizers
