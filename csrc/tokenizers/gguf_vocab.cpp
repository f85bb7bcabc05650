// A GGUF vocabulary, tokenizer.ggml.model "gpt2", as the byte-level BPE pipeline: what Hugging
// Face's tokenizer.json has for the family tokenizer.ggml.pre names.
#include "tokenizers/gguf_vocab.h"

#include <algorithm>
#include <initializer_list>
#include <string>
#include <utility>

#include "tokenizers/hf_tokenizer.h"
#include "tokenizers/unicode.h"

namespace qlora::tokenizers {
namespace detail {
namespace {

// GGUF vocabulary, tokenizer.ggml.model "gpt2"

[[noreturn]] void vocab_error(const std::string& key, const std::string& message) {
  throw TokenizerError("GGUF vocab: " + key + ": " + message);
}

void check_id(const std::optional<int32_t>& id, size_t n, const char* key) {
  if (id && (*id < 0 || static_cast<size_t>(*id) >= n)) {
    vocab_error(key,
                "id " + std::to_string(*id) + " is not below the " + std::to_string(n) + " tokens");
  }
}

// What Hugging Face's tokenizer.json has for the model family that tokenizer.ggml.pre names.
void configure_pre(const std::string& pre, HfParts& parts, BpeOptions& options) {
  auto in = [&pre](std::initializer_list<const char*> names) {
    return std::any_of(names.begin(), names.end(), [&pre](const char* n) { return pre == n; });
  };
  if (in({"llama3", "llama-v3", "llama-bpe", "falcon3"})) {
    parts.pre_tokenizer.add(
        split_step(Pattern::regex(kLlama3Pattern), SplitBehavior::kIsolated, false));
    parts.pre_tokenizer.add(byte_level_step(false, false));
    options.ignore_merges = true;
  } else if (in({"qwen2"})) {
    parts.normalizer.add(nfc);
    parts.pre_tokenizer.add(
        split_step(Pattern::regex(kQwen2Pattern), SplitBehavior::kIsolated, false));
    parts.pre_tokenizer.add(byte_level_step(false, false));
  } else if (in({"smollm", "starcoder", "refact"})) {
    parts.pre_tokenizer.add(split_step(Pattern::regex("\\p{N}"), SplitBehavior::kIsolated, false));
    parts.pre_tokenizer.add(byte_level_step(false, true));
  } else if (in({"gpt-2", "phi-2", "default", ""})) {
    parts.pre_tokenizer.add(byte_level_step(false, true));
  } else {
    vocab_error("tokenizer.ggml.pre",
                "\"" + pre +
                    "\" is not supported (llama-bpe, llama3, llama-v3, falcon3, qwen2, smollm, "
                    "starcoder, refact, gpt-2, phi-2, default)");
  }
}

BpeModel::MergeList gguf_merges(const std::vector<std::string>& merges) {
  BpeModel::MergeList out;
  out.reserve(merges.size());
  for (size_t i = 0; i < merges.size(); ++i) {
    // Split at the first space after the first character, as llama.cpp does.
    const size_t space = merges[i].find(' ', 1);
    if (space == std::string::npos) {
      vocab_error("tokenizer.ggml.merges[" + std::to_string(i) + "]", "expected \"left right\"");
    }
    out.emplace_back(merges[i].substr(0, space), merges[i].substr(space + 1));
  }
  return out;
}

int32_t token_type(const VocabSpec& spec, size_t i) {
  return spec.token_types.empty() ? static_cast<int32_t>(GgufTokenType::kNormal)
                                  : spec.token_types[i];
}

}  // namespace

std::unique_ptr<Tokenizer> byte_level_from_vocab(const VocabSpec& spec) {
  const size_t n = spec.tokens.size();
  if (n == 0) vocab_error("tokenizer.ggml.tokens", "empty");
  if (!spec.token_types.empty() && spec.token_types.size() != n) {
    vocab_error("tokenizer.ggml.token_type", std::to_string(spec.token_types.size()) +
                                                 " entries for " + std::to_string(n) + " tokens");
  }
  check_id(spec.bos_id, n, "tokenizer.ggml.bos_token_id");
  check_id(spec.eos_id, n, "tokenizer.ggml.eos_token_id");
  check_id(spec.unk_id, n, "tokenizer.ggml.unknown_token_id");
  check_id(spec.pad_id, n, "tokenizer.ggml.padding_token_id");

  HfParts parts;
  BpeOptions options;
  configure_pre(spec.pre, parts, options);
  BpeModel::Vocab vocab;
  for (size_t i = 0; i < n; ++i) {
    if (spec.tokens[i].empty()) continue;
    vocab[spec.tokens[i]] = static_cast<int32_t>(i);
    const auto type = static_cast<GgufTokenType>(token_type(spec, i));
    if (type == GgufTokenType::kControl || type == GgufTokenType::kUnknown ||
        type == GgufTokenType::kUserDefined) {
      AddedToken t;
      t.content = spec.tokens[i];
      t.id = static_cast<int32_t>(i);
      t.special = type != GgufTokenType::kUserDefined;
      parts.added_tokens.push_back(std::move(t));
    }
  }
  const auto error = [](size_t rank, const std::string& message) {
    vocab_error("tokenizer.ggml.merges[" + std::to_string(rank) + "]", message);
  };
  parts.model = BpeModel(std::move(vocab), gguf_merges(spec.merges), options, error);
  if (spec.add_bos && spec.bos_id) parts.post.prefix.push_back(*spec.bos_id);
  if (spec.add_eos && spec.eos_id) parts.post.suffix.push_back(*spec.eos_id);
  parts.decoder.add(decode_byte_level);
  parts.special = {spec.bos_id, spec.eos_id, spec.pad_id, spec.unk_id};
  return make_hf_tokenizer(std::move(parts));
}

}  // namespace detail

std::unique_ptr<Tokenizer> tokenizer_from_vocab(const VocabSpec& spec) {
  if (spec.model == "gpt2") return detail::byte_level_from_vocab(spec);
  if (spec.model == "llama") return detail::sentencepiece_from_vocab(spec);
  throw TokenizerError("GGUF vocab: tokenizer.ggml.model: \"" + spec.model +
                       "\" is not supported (\"gpt2\" or \"llama\")");
}

}  // namespace qlora::tokenizers
