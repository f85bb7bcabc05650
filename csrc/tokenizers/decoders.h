// tokenizers' decoders (ByteLevel, ByteFallback, Fuse, Replace, Strip, Metaspace, Sequence):
// token strings back to text, each step rewriting the list of tokens.
#pragma once

#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "tokenizers/json_node.h"

namespace qlora::tokenizers::detail {

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

// ByteLevel: the alphabet back to bytes, then UTF-8 repair.
TokenDecoder::Tokens decode_byte_level(TokenDecoder::Tokens tokens);

// Adds the steps tokenizer.json's "decoder" describes.
void parse_decoder(const JsonNode& node, TokenDecoder& out);

}  // namespace qlora::tokenizers::detail
