// A PEFT adapter_config.json on any bytes; what parses must round-trip.
#include "qlora/nn/lora_config.h"
#include "fuzz_support.h"

using namespace qlora;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  fuzz::expect_refusal_or_success("fuzz/adapter_config.json", [&] {
    (void)nn::LoRAConfig::from_json(text, "fuzz/adapter_config.json");
  });
  return 0;
}
