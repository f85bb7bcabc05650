// A tokenizer_config.json on any bytes beside a small valid tokenizer.json:
// the special tokens it names, the chat template, the added tokens.
#include "fuzz_support.h"
#include "tokenizer_exercise.h"

using namespace qlora;

namespace {

// A byte-level BPE over a few merges, with two added special tokens.
constexpr const char* kTokenizerJson = R"({
  "version": "1.0",
  "added_tokens": [
    {"id": 9, "content": "<eos>", "single_word": false, "lstrip": false, "rstrip": false,
     "normalized": false, "special": true},
    {"id": 10, "content": "<|im_start|>", "single_word": false, "lstrip": false,
     "rstrip": false, "normalized": false, "special": true}],
  "normalizer": null,
  "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                    "use_regex": true},
  "post_processor": null,
  "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
              "use_regex": true},
  "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false,
            "vocab": {"h": 0, "e": 1, "l": 2, "o": 3, "he": 4, "ll": 5, "hell": 6, "hello": 7,
                      "Ġ": 8},
            "merges": ["h e", "l l", "he ll", "hell o"]}
})";

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const bool made = [] {
    fuzz::write_scratch("tokenizer_config/tokenizer.json", kTokenizerJson);
    return true;
  }();
  (void)made;
  const std::string path =
      fuzz::write_scratch("tokenizer_config/tokenizer_config.json", data, size);
  fuzz::expect_refusal_or_success(path, [&] {
    const auto tok = tokenizers::load_tokenizer(fuzz::scratch_dir() + "/tokenizer_config");
    fuzz::exercise_tokenizer(*tok, {reinterpret_cast<const char*>(data), size});
  });
  return 0;
}
