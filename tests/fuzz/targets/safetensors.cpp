// SafetensorsReader::open (model shards, PEFT adapters) on any bytes, then
// every tensor as a zero-copy view and as a copy.
#include "qlora/io/safetensors.h"
#include "fuzz_support.h"

using namespace qlora;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = fuzz::write_scratch("input.safetensors", data, size);
  fuzz::expect_refusal_or_success(path, [&] {
    const auto reader = io::SafetensorsReader::open(path);
    (void)reader.metadata();
    for (const auto& t : reader.tensors()) {
      (void)reader.get(t.name, /*copy=*/false);
      if (t.end - t.begin <= (1u << 20)) (void)reader.get(t.name, /*copy=*/true);
    }
  });
  return 0;
}
