// Leftmost-longest matching of added tokens (see added_vocabulary.h).
#include "tokenizers/added_vocabulary.h"

#include <algorithm>
#include <array>
#include <utility>

#include "tokenizers/regex.h"
#include "tokenizers/unicode.h"

namespace qlora::tokenizers::detail {

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

}  // namespace qlora::tokenizers::detail
