// transformers' tokenizer_config.json beside a tokenizer file: the special tokens it names.
#pragma once

#include <optional>
#include <string>

namespace qlora::tokenizers::detail {

// The parts of transformers' tokenizer_config.json that change what encode() does or reports.
struct TokenizerConfig {
  std::optional<std::string> bos, eos, pad, unk;
  // add_bos_token / add_eos_token, when present (the tokenizers heed them for tokenizer.model
  // only; the GGUF export copies them).
  std::optional<bool> add_bos, add_eos;
  // The chat template, when it is one string (not read by the tokenizers; the GGUF export
  // copies it).
  std::optional<std::string> chat_template;
};

// Reads the tokenizer_config.json in the directory of `tokenizer_file`, if there is one.
std::optional<TokenizerConfig> read_tokenizer_config(const std::string& tokenizer_file);

}  // namespace qlora::tokenizers::detail
