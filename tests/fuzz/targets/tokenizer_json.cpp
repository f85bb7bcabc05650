// A Hugging Face tokenizer.json on any bytes (no tokenizer_config.json
// beside it), then used; and the same file read as the GGUF export reads
// its vocabulary (read_tokenizer_json_vocab, pre-tokenizer naming included).
#include "tokenizers/tokenizer_json.h"
#include "fuzz_support.h"
#include "tokenizer_exercise.h"

using namespace qlora;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = fuzz::write_scratch("tokenizer_json/tokenizer.json", data, size);
  fuzz::expect_refusal_or_success(path, [&] {
    const auto tok = tokenizers::load_tokenizer_json(path);
    fuzz::exercise_tokenizer(*tok, {reinterpret_cast<const char*>(data), size});
  });
  fuzz::expect_refusal_or_success(path, [&] { (void)tokenizers::read_tokenizer_json_vocab(path); });
  return 0;
}
