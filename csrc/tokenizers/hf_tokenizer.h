// The Hugging Face pipeline assembled: added tokens, normalizer, pre-tokenizer, BPE model,
// post-processor and decoder, as tokenizer.json or a GGUF vocabulary describes them.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "qlora/tokenizers/tokenizer.h"
#include "tokenizers/added_vocabulary.h"
#include "tokenizers/bpe_model.h"
#include "tokenizers/decoders.h"
#include "tokenizers/normalizers.h"
#include "tokenizers/post_processors.h"
#include "tokenizers/pre_tokenizers.h"

namespace qlora::tokenizers::detail {

struct SpecialIds {
  std::optional<int32_t> bos, eos, pad, unk;
};

struct HfParts {
  TextNormalizer normalizer;
  std::vector<AddedToken> added_tokens;
  PreTokenizer pre_tokenizer;
  BpeModel model;
  Template post;
  TokenDecoder decoder;
  SpecialIds special;
};

std::unique_ptr<Tokenizer> make_hf_tokenizer(HfParts parts);

}  // namespace qlora::tokenizers::detail
