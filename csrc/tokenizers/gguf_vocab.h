// Tokenizers built from a GGUF file's vocabulary (tokenizer.ggml.*): "gpt2" becomes the
// byte-level BPE pipeline, "llama" the SentencePiece tokenizer.
#pragma once

#include <memory>

#include "qlora/tokenizers/tokenizer.h"

namespace qlora::tokenizers::detail {

// tokenizer.ggml.model "gpt2" (gguf_vocab.cpp).
std::unique_ptr<Tokenizer> byte_level_from_vocab(const VocabSpec& spec);
// tokenizer.ggml.model "llama" (sentencepiece_tokenizer.cpp).
std::unique_ptr<Tokenizer> sentencepiece_from_vocab(const VocabSpec& spec);

}  // namespace qlora::tokenizers::detail
