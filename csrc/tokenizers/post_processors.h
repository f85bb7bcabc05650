// tokenizers' post-processors (TemplateProcessing, RobertaProcessing, BertProcessing,
// ByteLevel, Sequence): what encode(text, add_special_tokens = true) puts around the ids.
#pragma once

#include <cstdint>
#include <vector>

#include "tokenizers/json_node.h"

namespace qlora::tokenizers::detail {

struct Template {
  std::vector<int32_t> prefix;
  std::vector<int32_t> suffix;

  // A later processor of a Sequence wraps what the earlier ones produced.
  void wrap(const Template& outer) {
    prefix.insert(prefix.begin(), outer.prefix.begin(), outer.prefix.end());
    suffix.insert(suffix.end(), outer.suffix.begin(), outer.suffix.end());
  }
};

// Wraps `out` in what tokenizer.json's "post_processor" adds.
void parse_post_processor(const JsonNode& node, Template& out);

}  // namespace qlora::tokenizers::detail
