// encode / decode through the stages (see hf_tokenizer.h).
#include "tokenizers/hf_tokenizer.h"

#include <algorithm>
#include <string>
#include <string_view>
#include <utility>

#include "tokenizers/unicode.h"

namespace qlora::tokenizers::detail {

namespace {

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
    if (!utf8_valid(text)) text = repaired = utf8_lossy(text);
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
  Normalizer normalize_;
  AddedVocabulary added_;
  size_t vocab_size_ = 0;
};

}  // namespace

std::unique_ptr<Tokenizer> make_hf_tokenizer(HfParts parts) {
  return std::make_unique<HfTokenizer>(std::move(parts));
}

}  // namespace qlora::tokenizers::detail
