// Command-line bridge for the Python interop tests:
//   safetensors_tool copy IN OUT   read IN with our reader, write OUT with our writer
//   safetensors_tool check IN      validate IN and list "name dtype shape" per tensor
// Exits 0 on success, 1 with the error on stderr when a file is rejected,
// 2 on bad usage.
#include <c10/util/Exception.h>

#include <cstring>
#include <iostream>
#include <string>
#include <utility>
#include <vector>

#include "qlora/io/safetensors.h"

namespace {

using qlora::io::SafetensorsReader;

void copy(const std::string& in, const std::string& out) {
  const SafetensorsReader reader = SafetensorsReader::open(in);
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  for (const qlora::io::TensorInfo& t : reader.tensors())
    tensors.emplace_back(t.name, reader.get(t.name));
  qlora::io::save_safetensors(out, tensors, reader.metadata());
}

void check(const std::string& in) {
  const SafetensorsReader reader = SafetensorsReader::open(in);
  for (const qlora::io::TensorInfo& t : reader.tensors()) {
    std::cout << t.name << ' ' << qlora::io::safetensors_dtype_name(t.dtype) << " [";
    for (size_t i = 0; i < t.shape.size(); ++i) std::cout << (i > 0 ? ", " : "") << t.shape[i];
    std::cout << "]\n";
  }
}

int usage() {
  std::cerr << "usage: safetensors_tool copy IN OUT | safetensors_tool check IN\n";
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  const std::vector<std::string> args(argv + 1, argv + argc);
  try {
    if (args.size() == 3 && args[0] == "copy") {
      copy(args[1], args[2]);
    } else if (args.size() == 2 && args[0] == "check") {
      check(args[1]);
    } else {
      return usage();
    }
  } catch (const c10::Error& e) {
    // what() would append a C++ backtrace meant for developers.
    std::cerr << "safetensors_tool: " << e.what_without_backtrace() << '\n';
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "safetensors_tool: " << e.what() << '\n';
    return 1;
  }
  return 0;
}
