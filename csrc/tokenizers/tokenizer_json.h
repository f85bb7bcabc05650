// tokenizer.json, Hugging Face's tokenizer file: besides the tokenizer it describes
// (load_tokenizer_json in qlora/tokenizers/tokenizer.h), its vocabulary as the file writes it,
// for writers of other formats (the GGUF export), so that one parser reads the file.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace qlora::tokenizers {

// A tokenizer.json's vocabulary with the file's own ids (not the ids the tokenizer would
// reassign to added tokens), and what the tokenizer_config.json beside it names.
struct TokenizerJsonVocab {
  std::string model_type;  // "model"."type", "" when absent; the rest is read for "BPE" only
  // Every id's token: "model"."vocab", with "added_tokens" written over it.
  std::map<int32_t, std::string> tokens;
  // The added tokens' ids and their "special" flag (the last entry of an id wins).
  std::map<int32_t, bool> added_special;
  std::vector<std::pair<std::string, std::string>> merges;  // in rank order
  // The lowest id of the token tokenizer_config.json names (unk: else the model's
  // "unk_token"); absent when unnamed or not in `tokens`.
  std::optional<int32_t> bos_id, eos_id, unk_id, pad_id;
  // tokenizer_config.json's add_bos_token, else whether the "post_processor", a
  // TemplateProcessing, starts its single template with a special token.
  bool add_bos = false;
  std::optional<bool> add_eos;               // tokenizer_config.json's add_eos_token
  std::optional<std::string> chat_template;  // tokenizer_config.json's, when one string
  // llama.cpp's name for the "pre_tokenizer" (GGUF tokenizer.ggml.pre): "gpt-2" (ByteLevel
  // with its own regex), "smollm" (single digits, then that), "llama-bpe" (Llama 3's split
  // regex), "qwen2" (the same with single digits); "default" for any other, which llama.cpp
  // runs with its generic regex and a warning that output quality will degrade.
  std::string ggml_pre = "default";
};

// Reads `path` (a tokenizer.json) and the tokenizer_config.json in its folder, if any.
// Throws TokenizerError naming the file and the key.
TokenizerJsonVocab read_tokenizer_json_vocab(const std::string& path);

}  // namespace qlora::tokenizers
