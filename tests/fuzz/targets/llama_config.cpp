// A model's config.json on any bytes.
#include "qlora/models/llama_config.h"
#include "fuzz_support.h"

using namespace qlora;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  fuzz::expect_refusal_or_success(
      "fuzz/config.json", [&] { (void)models::LlamaConfig::from_json(text, "fuzz/config.json"); });
  return 0;
}
