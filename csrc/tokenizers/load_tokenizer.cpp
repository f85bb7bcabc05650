// Which tokenizer a path holds (a GGUF file, tokenizer.json, tokenizer.model or a model folder),
// and a GGUF file's vocabulary as a VocabSpec.
#include "qlora/io/gguf.h"
#include "qlora/tokenizers/tokenizer.h"
#include "util/fs.h"
#include "util/strings.h"

namespace qlora::tokenizers {

namespace {

using fs::is_dir;
using fs::is_file;
using util::ends_with;

std::optional<int32_t> optional_id(const io::GgufReader& r, const char* key) {
  if (!r.has(key)) return std::nullopt;
  return static_cast<int32_t>(r.get_int(key));
}

}  // namespace

VocabSpec vocab_from_gguf(const std::string& gguf_path) {
  const auto r = io::GgufReader::open(gguf_path);
  VocabSpec v;
  v.model = r.get_string("tokenizer.ggml.model");
  if (r.has("tokenizer.ggml.pre")) v.pre = r.get_string("tokenizer.ggml.pre");
  v.tokens = r.get_string_array("tokenizer.ggml.tokens");
  if (r.has("tokenizer.ggml.scores")) v.scores = r.get_f32_array("tokenizer.ggml.scores");
  if (r.has("tokenizer.ggml.token_type")) {
    for (int64_t t : r.get(std::string("tokenizer.ggml.token_type")).get_int_array())
      v.token_types.push_back(static_cast<int32_t>(t));
  }
  if (r.has("tokenizer.ggml.merges")) v.merges = r.get_string_array("tokenizer.ggml.merges");
  v.bos_id = optional_id(r, "tokenizer.ggml.bos_token_id");
  v.eos_id = optional_id(r, "tokenizer.ggml.eos_token_id");
  v.unk_id = optional_id(r, "tokenizer.ggml.unknown_token_id");
  v.pad_id = optional_id(r, "tokenizer.ggml.padding_token_id");
  // llama.cpp's defaults when the file does not say.
  const bool default_bos = v.model == "llama" || v.pre == "llama-bpe";
  v.add_bos = r.has("tokenizer.ggml.add_bos_token") ? r.get_bool("tokenizer.ggml.add_bos_token")
                                                    : default_bos;
  v.add_eos = r.has("tokenizer.ggml.add_eos_token") && r.get_bool("tokenizer.ggml.add_eos_token");
  if (r.has("tokenizer.ggml.add_space_prefix"))
    v.add_space_prefix = r.get_bool("tokenizer.ggml.add_space_prefix");
  return v;
}

std::unique_ptr<Tokenizer> load_tokenizer(const std::string& path) {
  if (ends_with(path, ".gguf")) {
    const VocabSpec spec = vocab_from_gguf(path);
    // The spec no longer knows its file; a refusal must still name it.
    try {
      return tokenizer_from_vocab(spec);
    } catch (const TokenizerError& e) {
      throw TokenizerError(path + ": " + e.what());
    }
  }
  if (ends_with(path, ".json") && is_file(path)) return load_tokenizer_json(path);
  if (ends_with(path, ".model") && is_file(path)) return load_sentencepiece(path);
  if (is_dir(path)) {
    if (is_file(path + "/tokenizer.json")) return load_tokenizer_json(path + "/tokenizer.json");
    if (is_file(path + "/tokenizer.model")) return load_sentencepiece(path + "/tokenizer.model");
    throw TokenizerError("no tokenizer in \"" + path +
                         "\": expected tokenizer.json or tokenizer.model");
  }
  throw TokenizerError("cannot load a tokenizer from \"" + path +
                       "\": expected a .gguf file, a tokenizer.json / tokenizer.model file, or a "
                       "model folder holding one");
}

}  // namespace qlora::tokenizers
