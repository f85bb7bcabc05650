// GgufReader::open on any bytes, in both offset modes, then what the model
// loader reads of a file that opened: every value, every tensor's bytes, the
// dequantised weights, and the LLaMA hyper-parameters.
#include "qlora/io/gguf.h"
#include "fuzz_support.h"
#include "qlora/models/llama_config.h"

using namespace qlora;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = fuzz::write_scratch("input.gguf", data, size);
  for (const bool strict : {true, false}) {
    fuzz::expect_refusal_or_success(path, [&] {
      const auto reader = io::GgufReader::open(path, {strict});
      for (const auto& key : reader.keys()) (void)reader.get(key).to_string(4);
      for (const auto& t : reader.tensors()) {
        (void)reader.raw(t.name);
        if (io::ggml_can_dequantize(t.type) && t.numel() <= (int64_t{1} << 16))
          (void)reader.dequantize(t.name);
      }
      (void)models::LlamaConfig::from_gguf(reader);
    });
  }
  return 0;
}
