// Tokenisation of rendered records into examples with a loss mask (labels), and truncation.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "qlora/data/prompt_template.h"
#include "qlora/data/records.h"

namespace qlora::tokenizers {
class Tokenizer;
}

namespace qlora::data {

// The label of tokens that contribute no loss (PyTorch's cross_entropy ignore_index default).
inline constexpr int32_t kIgnoreIndex = -100;

struct Example {
  std::vector<int32_t> input_ids;
  std::vector<int32_t> labels;  // same length, unshifted, kIgnoreIndex where not supervised
  std::shared_ptr<const Record> record;  // the record it came from; null if built by hand

  int64_t size() const { return static_cast<int64_t>(input_ids.size()); }
  int64_t supervised_tokens() const;
};

// Truncation, when prompt + completion (P + C tokens, BOS and EOS included) exceed max_length:
// the completion is cut first, from its end (so a cut completion has no EOS: the model must not
// learn to stop mid-answer), down to max(max_length - P, min_completion_tokens) tokens; if the
// prompt still does not fit, it is cut from its start, keeping BOS and the tokens nearest the
// answer (the "### Response:" / "<|im_start|>assistant\n" header). An example left with no
// supervised token is dropped and reported.
struct TokenizeOptions {
  int64_t max_length = 2048;
  int64_t min_completion_tokens = 32;
};

// Prompt and completion are encoded separately (without the tokenizer's own special tokens) and
// concatenated, so the label boundary falls exactly between them: BOS (when tokenizer.add_bos())
// + encode(prompt) | encode(completion) + EOS (skipped when the completion already ends with it
// or the tokenizer has none). Returns nullopt when nothing supervised is left; `truncated` tells
// whether max_length cut anything.
std::optional<Example> tokenize_example(const RenderedText& text,
                                        const tokenizers::Tokenizer& tokenizer,
                                        const TokenizeOptions& options, bool* truncated = nullptr);

struct TokenizeResult {
  std::vector<Example> examples;
  std::vector<DataIssue> issues;  // dropped examples, with the record's file:line
  int64_t truncated = 0;          // kept examples that max_length cut
};
TokenizeResult tokenize_records(const std::vector<Record>& records, const PromptTemplate& tmpl,
                                const tokenizers::Tokenizer& tokenizer,
                                const TokenizeOptions& options);

// The id padding is written with: pad, else EOS, else 0 (padding is masked out either way).
int32_t padding_id(const tokenizers::Tokenizer& tokenizer);

}  // namespace qlora::data
