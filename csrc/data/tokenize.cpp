// Tokenisation with the loss mask, and the truncation rule documented in dataset.h.
#include <algorithm>
#include <stdexcept>

#include "data/data_internal.h"
#include "qlora/tokenizers/tokenizer.h"

namespace qlora::data {
namespace {

using Ids = std::vector<int32_t>;

struct Parts {
  Ids prompt;      // BOS included
  Ids completion;  // EOS included
  bool has_bos = false;
};

Parts encode_parts(const RenderedText& text, const tokenizers::Tokenizer& tokenizer) {
  Parts parts;
  const std::optional<int32_t> bos = tokenizer.bos_id();
  if (tokenizer.add_bos() && bos) {
    parts.prompt.push_back(*bos);
    parts.has_bos = true;
  }
  const Ids prompt = tokenizer.encode(text.prompt, /*add_special_tokens=*/false);
  parts.prompt.insert(parts.prompt.end(), prompt.begin(), prompt.end());
  parts.completion = tokenizer.encode(text.completion, /*add_special_tokens=*/false);
  // ChatML completions end in <|im_end|>, which is SmolLM2-Instruct's EOS: no second copy.
  const std::optional<int32_t> eos = tokenizer.eos_id();
  if (eos && (parts.completion.empty() || parts.completion.back() != *eos)) {
    parts.completion.push_back(*eos);
  }
  return parts;
}

// Cuts `parts` to max_length tokens; returns whether anything was cut.
bool truncate(Parts& parts, const TokenizeOptions& options) {
  const int64_t limit = options.max_length;
  const int64_t p = static_cast<int64_t>(parts.prompt.size());
  const int64_t c = static_cast<int64_t>(parts.completion.size());
  if (p + c <= limit) return false;
  const int64_t keep_c = std::min(
      {c, limit, std::max(limit - p, std::max<int64_t>(options.min_completion_tokens, 0))});
  const int64_t keep_p = limit - keep_c;  // < p here, since p + c > limit
  parts.completion.resize(static_cast<size_t>(keep_c));
  if (keep_p < p) {
    // Keep the prompt's end (the response header the completion follows) and its BOS.
    Ids prompt;
    const int64_t bos = parts.has_bos && keep_p > 0 ? 1 : 0;
    if (bos) prompt.push_back(parts.prompt.front());
    prompt.insert(prompt.end(), parts.prompt.end() - (keep_p - bos), parts.prompt.end());
    parts.prompt = std::move(prompt);
  }
  return true;
}

}  // namespace

int64_t Example::supervised_tokens() const {
  return std::count_if(labels.begin(), labels.end(), [](int32_t l) { return l != kIgnoreIndex; });
}

std::optional<Example> tokenize_example(const RenderedText& text,
                                        const tokenizers::Tokenizer& tokenizer,
                                        const TokenizeOptions& options, bool* truncated) {
  if (options.max_length < 1)
    throw std::invalid_argument("TokenizeOptions: max_length must be >= 1");
  Parts parts = encode_parts(text, tokenizer);
  const bool cut = truncate(parts, options);
  if (truncated != nullptr) *truncated = cut;
  Example example;
  example.input_ids = parts.prompt;
  example.input_ids.insert(example.input_ids.end(), parts.completion.begin(),
                           parts.completion.end());
  example.labels.assign(parts.prompt.size(), kIgnoreIndex);
  example.labels.insert(example.labels.end(), parts.completion.begin(), parts.completion.end());
  // See dataset.h: the first token is never a target, and saying so keeps packing safe.
  if (!example.labels.empty()) example.labels.front() = kIgnoreIndex;
  if (example.supervised_tokens() == 0) return std::nullopt;
  return example;
}

TokenizeResult tokenize_records(const std::vector<Record>& records, const PromptTemplate& tmpl,
                                const tokenizers::Tokenizer& tokenizer,
                                const TokenizeOptions& options) {
  TokenizeResult result;
  result.examples.reserve(records.size());
  for (const Record& record : records) {
    bool truncated = false;
    std::optional<Example> example =
        tokenize_example(tmpl.render(record), tokenizer, options, &truncated);
    if (!example) {
      result.issues.push_back({record.file, record.line,
                               "dropped: no supervised token left (max_length " +
                                   std::to_string(options.max_length) + ")"});
      continue;
    }
    if (truncated) ++result.truncated;
    example->record = std::make_shared<const Record>(record);
    result.examples.push_back(std::move(*example));
  }
  return result;
}

int32_t padding_id(const tokenizers::Tokenizer& tokenizer) {
  if (const auto pad = tokenizer.pad_id()) return *pad;
  if (const auto eos = tokenizer.eos_id()) return *eos;
  return 0;
}

}  // namespace qlora::data
