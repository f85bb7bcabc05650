// tokenizers' normalizers (NFC, NFD, Prepend, Replace, Sequence): text to text, applied to
// what added tokens leave.
#pragma once

#include <functional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "tokenizers/json_node.h"

namespace qlora::tokenizers::detail {

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

// Adds the steps tokenizer.json's "normalizer" describes.
void parse_normalizer(const JsonNode& node, TextNormalizer& out);

}  // namespace qlora::tokenizers::detail
