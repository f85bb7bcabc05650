// Added tokens (tokenizer.json's "added_tokens", a GGUF vocabulary's control tokens): found in
// the raw text before any other stage, as Hugging Face's AddedVocabulary finds them. Shared by
// the byte-level BPE and the SentencePiece tokenizers.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <unordered_set>
#include <vector>

namespace qlora::tokenizers::detail {

// A token matched in the raw text before any other processing, as tokenizer.json's
// "added_tokens" describe them.
struct AddedToken {
  std::string content;
  int32_t id = -1;
  bool special = false;
  bool single_word = false;  // only match between non-word characters
  bool lstrip = false;       // swallow the whitespace on its left
  bool rstrip = false;       // swallow the whitespace on its right
  bool normalized = false;   // match against the normalized text instead of the raw text
};

// A stretch of the input: an added token, or text for the model.
struct Segment {
  int32_t id = -1;   // the added token, or -1 for text
  std::string text;  // the normalized text (empty for a token)
  // Starts at offset 0 of the input; Metaspace's prepend_scheme "first" depends on it.
  bool at_origin = false;
};

using Normalizer = std::function<std::string(std::string_view)>;

// Finds added tokens in text the way Hugging Face's AddedVocabulary does: leftmost-longest
// matches of the non-normalized tokens on the raw text; the stretches between them are
// normalized, then searched for the normalized tokens.
class AddedVocabulary {
 public:
  AddedVocabulary();
  ~AddedVocabulary();
  AddedVocabulary(AddedVocabulary&&) noexcept;
  AddedVocabulary& operator=(AddedVocabulary&&) noexcept;

  // Normalized tokens are matched in their normalized form, hence the normalizer here.
  void build(std::vector<AddedToken> tokens, const Normalizer& normalizer);

  std::vector<Segment> split(std::string_view text, const Normalizer& normalizer) const;

  bool empty() const { return tokens_.empty(); }
  const std::vector<AddedToken>& tokens() const { return tokens_; }
  std::optional<int32_t> token_to_id(std::string_view content) const;
  const AddedToken* find_id(int32_t id) const;
  // Decoding drops special tokens by content, whichever id produced them.
  bool is_special_content(const std::string& content) const;

 private:
  struct Trie;
  struct Match {
    size_t start, stop;
    int32_t id;  // -1: text between tokens
  };
  std::vector<Match> find_matches(std::string_view sentence, const Trie& trie) const;

  std::vector<AddedToken> tokens_;
  std::unordered_map<std::string, size_t> by_content_;
  std::unordered_map<int32_t, size_t> by_id_;
  std::unordered_set<std::string> special_contents_;
  std::unique_ptr<Trie> raw_trie_;
  std::unique_ptr<Trie> normalized_trie_;
};

}  // namespace qlora::tokenizers::detail
