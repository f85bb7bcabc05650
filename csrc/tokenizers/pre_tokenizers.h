// tokenizers' pre-tokenizers (ByteLevel, Split, Digits, Metaspace, Sequence): the normalized
// text cut into the pieces the model tokenizes one by one.
#pragma once

#include <functional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "tokenizers/json_node.h"
#include "tokenizers/regex.h"

namespace qlora::tokenizers::detail {

struct Piece {
  std::string text;
  bool at_origin = false;
};

// How a Split keeps the matches of its pattern (tokenizers' SplitDelimiterBehavior).
enum class SplitBehavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

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

PreTokenizer::Step split_step(Pattern pattern, SplitBehavior behavior, bool invert);
PreTokenizer::Step byte_level_step(bool add_prefix_space, bool use_regex);

// Metaspace's prepend_scheme (also read by its decoder).
enum class PrependScheme { kAlways, kFirst, kNever };
PrependScheme parse_prepend_scheme(const JsonNode& node);
PreTokenizer::Step metaspace_step(std::string replacement, PrependScheme scheme, bool split);
// Every `from` in s replaced by `to` (Metaspace's spaces, and back in its decoder).
std::string replace_all(std::string_view s, std::string_view from, std::string_view to);

// A string value that must be one character (Metaspace's replacement, Strip's content).
std::string single_char(const JsonNode& node);

// Adds the steps tokenizer.json's "pre_tokenizer" describes.
void parse_pre_tokenizer(const JsonNode& node, PreTokenizer& out);

}  // namespace qlora::tokenizers::detail
