// Test driver for the bitsandbytes checkpoint conformance tests: our C++
// QuantState loader/writer on real safetensors files.
//   quant_state_tool dequantize IN.safetensors PREFIX OUT.safetensors
//   quant_state_tool quantize IN.safetensors NAME OUT.safetensors BLOCKSIZE TYPE DOUBLE_QUANT
#include <iostream>
#include <map>
#include <string>

#include "qlora/io/safetensors.h"
#include "qlora/quant_state.h"

namespace {

int usage() {
  std::cerr << "usage: quant_state_tool dequantize IN PREFIX OUT\n"
               "       quant_state_tool quantize IN NAME OUT BLOCKSIZE nf4|fp4 0|1\n";
  return 2;
}

int run(int argc, char** argv) {
  const std::string verb = argc > 1 ? argv[1] : "";
  if (verb == "dequantize" && argc == 5) {
    const auto tensors = qlora::io::SafetensorsReader::open(argv[2]).load_all();
    auto [packed, state] = qlora::QuantState::from_state_dict(argv[3], tensors);
    const std::map<std::string, at::Tensor> out{
        {"dequantized", qlora::dequantize_4bit(packed, state)}};
    qlora::io::save_safetensors(argv[4], out);
    return 0;
  }
  if (verb == "quantize" && argc == 8) {
    const at::Tensor w = qlora::io::SafetensorsReader::open(argv[2]).get(argv[3], /*copy=*/true);
    const qlora::QuantConfig config{std::stoll(argv[5]), argv[6], std::string(argv[7]) == "1"};
    auto [packed, state] = qlora::quantize_4bit(w, config);
    qlora::io::save_safetensors(argv[4], state.to_state_dict(argv[3], packed));
    return 0;
  }
  return usage();
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const c10::Error& e) {
    std::cerr << "error: " << e.what_without_backtrace() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
}
