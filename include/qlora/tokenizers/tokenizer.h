// Tokenizers for the models qlora fine-tunes, in plain C++ (no LibTorch), producing the same ids
// as the Hugging Face `tokenizers` package (0.23) and transformers (5.x):
//
//  - load_tokenizer_json: a Hugging Face tokenizer.json with a BPE model: byte-level BPE as
//    GPT-2, Llama 3, Qwen2 and SmolLM use it, and byte-fallback BPE as Llama 2 / Mistral
//    conversions use it. tokenizer_config.json next to it, when present, names the bos/eos/
//    pad/unk tokens; its add_bos_token/add_eos_token are ignored, as transformers 5 ignores
//    them when a tokenizer.json exists (the file's post-processor decides).
//  - load_sentencepiece: a SentencePiece tokenizer.model (Llama 2, Mistral): BPE models with
//    the "identity" normalizer, read and run here (no libsentencepiece), with the ids
//    libsentencepiece gives. BOS is added unless a tokenizer_config.json next to it says
//    add_bos_token: false. Other model types (unigram, ...) and normalizers are refused.
//  - tokenizer_from_vocab: the vocabulary stored in a GGUF file (tokenizer.ggml.* keys), for
//    models shipped without tokenizer files.
//
// Special tokens written in the text (e.g. "<|im_start|>") are recognised and encoded as their
// ids, as Hugging Face does by default. Text that is not valid UTF-8 is first repaired the way
// Python's bytes.decode(errors="replace") does (each invalid sequence becomes U+FFFD).
//
// All methods are const and safe to call from several threads at once.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace qlora::tokenizers {

// A tokenizer file that cannot be used: unreadable, malformed, or using a feature not
// implemented here. The message names the file and the offending key.
class TokenizerError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  // With add_special_tokens, the model's template is applied (e.g. BOS first for Llama).
  virtual std::vector<int32_t> encode(std::string_view text,
                                      bool add_special_tokens = true) const = 0;
  // Ids that name no token are skipped, as Hugging Face does.
  virtual std::string decode(const std::vector<int32_t>& ids,
                             bool skip_special_tokens = false) const = 0;

  // One past the largest id, added tokens included: the embedding rows the ids index.
  virtual size_t vocab_size() const = 0;
  virtual std::optional<int32_t> token_to_id(std::string_view token) const = 0;
  virtual std::optional<std::string> id_to_token(int32_t id) const = 0;

  virtual std::optional<int32_t> bos_id() const = 0;
  virtual std::optional<int32_t> eos_id() const = 0;
  virtual std::optional<int32_t> pad_id() const = 0;
  virtual std::optional<int32_t> unk_id() const = 0;
  // Whether encode(text, true) puts bos_id() first / eos_id() last.
  virtual bool add_bos() const = 0;
  virtual bool add_eos() const = 0;
  // Special tokens (control tokens) are those decode(..., true) drops.
  virtual bool is_special(int32_t id) const = 0;
};

// tokenizer.ggml.token_type values.
enum class GgufTokenType : int32_t {
  kNormal = 1,
  kUnknown = 2,
  kControl = 3,      // special: matched in text, dropped by decode(skip_special_tokens)
  kUserDefined = 4,  // added token: matched in text, kept by decode
  kUnused = 5,
  kByte = 6,  // <0xXX> byte-fallback pieces
};

// The tokenizer as a GGUF file describes it (the tokenizer.ggml.* metadata).
struct VocabSpec {
  std::string model;  // tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece)
  // tokenizer.ggml.pre, selecting the pre-tokenizer regex of a byte-level BPE ("llama-bpe",
  // "qwen2", "smollm", "gpt-2", "default", ...). Unused for "llama".
  std::string pre;
  std::vector<std::string> tokens;   // tokenizer.ggml.tokens; the id is the index
  std::vector<float> scores;         // tokenizer.ggml.scores (required for "llama")
  std::vector<int32_t> token_types;  // tokenizer.ggml.token_type (GgufTokenType); may be empty
  std::vector<std::string> merges;   // tokenizer.ggml.merges, "left right" (required for "gpt2")
  std::optional<int32_t> bos_id;     // tokenizer.ggml.bos_token_id
  std::optional<int32_t> eos_id;     // tokenizer.ggml.eos_token_id
  std::optional<int32_t> unk_id;     // tokenizer.ggml.unknown_token_id
  std::optional<int32_t> pad_id;     // tokenizer.ggml.padding_token_id
  // tokenizer.ggml.add_bos_token / add_eos_token. The reader fills these; where the file lacks
  // the keys, llama.cpp's defaults are add_bos = true for "llama" and for pre "llama-bpe".
  bool add_bos = false;
  bool add_eos = false;
  // tokenizer.ggml.add_space_prefix ("llama" only): prepend "▁" to the text, as SentencePiece's
  // add_dummy_prefix does.
  bool add_space_prefix = true;
};

// Throws TokenizerError (naming the file and key) for unreadable or unsupported files.
std::unique_ptr<Tokenizer> load_tokenizer_json(const std::string& path);
std::unique_ptr<Tokenizer> load_sentencepiece(const std::string& model_path);
std::unique_ptr<Tokenizer> tokenizer_from_vocab(const VocabSpec& spec);

}  // namespace qlora::tokenizers

namespace qlora::tokenizers {

// The tokenizer of a model, wherever it lives: a .gguf file (its
// tokenizer.ggml.* metadata), a tokenizer.json or tokenizer.model file, or a
// model folder holding one of those.
std::unique_ptr<Tokenizer> load_tokenizer(const std::string& path);

// VocabSpec from a GGUF file's tokenizer.ggml.* keys.
VocabSpec vocab_from_gguf(const std::string& gguf_path);

// VocabSpec ("llama") of a SentencePiece tokenizer.model: its pieces, scores and types, the
// ids of the pieces its trainer_spec names, add_dummy_prefix; add_bos as load_sentencepiece
// (true unless a tokenizer_config.json beside it says otherwise). What a GGUF export writes.
VocabSpec sentencepiece_vocab(const std::string& model_path);

}  // namespace qlora::tokenizers
