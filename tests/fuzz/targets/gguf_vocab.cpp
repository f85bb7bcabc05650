// A GGUF file's tokenizer.ggml.* metadata made into a tokenizer (models
// shipped without tokenizer files) by load_tokenizer, as the product does, then used.
#include "fuzz_support.h"
#include "tokenizer_exercise.h"

using namespace qlora;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = fuzz::write_scratch("vocab.gguf", data, size);
  fuzz::expect_refusal_or_success(path, [&] {
    const auto tok = tokenizers::load_tokenizer(path);
    fuzz::exercise_tokenizer(*tok, {reinterpret_cast<const char*>(data), size});
  });
  return 0;
}
