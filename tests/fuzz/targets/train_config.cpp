// A training YAML config on any bytes; a config that parses must survive
// the round trip through to_yaml() that every checkpoint makes.
#include "fuzz_support.h"
#include "qlora/train/config.h"

using namespace qlora;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  fuzz::expect_refusal_or_success("fuzz.yaml", [&] {
    const auto config = train::TrainConfig::from_yaml_string(text, {}, "fuzz.yaml");
    const std::string yaml = config.to_yaml();
    const auto again = train::TrainConfig::from_yaml_string(yaml, {}, "fuzz.yaml (written)");
    if (again.to_yaml() != yaml) fuzz::finding("to_yaml does not round-trip", yaml);
  });
  return 0;
}
