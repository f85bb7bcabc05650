// Command-line bridge for the Python GGUF tests:
//   gguf_tool [--lenient] dump FILE
//       validate FILE and list it, one item per line:
//         version N / alignment N / data_offset N
//         kv KEY TYPE VALUE                 (TYPE is e.g. UINT32 or ARRAY[STRING]:COUNT)
//         tensor NAME TYPE ne=A,B offset=N nbytes=N
//   gguf_tool [--lenient] dequant FILE OUT.safetensors [NAME...]
//       dequantise every tensor to float32 (shape: reversed ne) and save them
//       under their GGUF names, or only the NAMEs given.
// --lenient opens with strict_offsets = false. Exits 0 on success, 1 with
// the error on stderr when a file is rejected, 2 on bad usage.
#include <c10/util/Exception.h>

#include <algorithm>
#include <iostream>
#include <string>
#include <utility>
#include <vector>

#include "qlora/io/gguf.h"
#include "qlora/io/safetensors.h"

namespace {

using qlora::io::GgufReader;
using qlora::io::GgufTensorInfo;
using qlora::io::GgufValue;

// Enough elements to see a vocabulary's start without flooding the terminal.
constexpr size_t kMaxArrayElements = 16;

std::string type_label(const GgufValue& v) {
  if (!v.is_array()) return qlora::io::gguf_type_name(v.type());
  return "ARRAY[" + qlora::io::gguf_type_name(v.element_type()) + "]:" + std::to_string(v.size());
}

std::string ne_label(const std::vector<int64_t>& ne) {
  std::string out;
  for (size_t i = 0; i < ne.size(); ++i) out += (i > 0 ? "," : "") + std::to_string(ne[i]);
  return out;
}

void dump(const GgufReader& reader) {
  std::cout << "version " << reader.version() << "\nalignment " << reader.alignment()
            << "\ndata_offset " << reader.data_offset() << '\n';
  for (const std::string& key : reader.keys()) {
    const GgufValue& v = reader.get(key);
    std::cout << "kv " << key << ' ' << type_label(v) << ' ' << v.to_string(kMaxArrayElements)
              << '\n';
  }
  for (const GgufTensorInfo& t : reader.tensors()) {
    std::cout << "tensor " << t.name << ' ' << qlora::io::ggml_type_name(t.type)
              << " ne=" << ne_label(t.ne) << " offset=" << t.offset << " nbytes=" << t.nbytes
              << '\n';
  }
}

void dequant(const GgufReader& reader, const std::string& out,
             const std::vector<std::string>& only) {
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  for (const GgufTensorInfo& t : reader.tensors()) {
    // Every tensor is dequantised (and so checked), even when not saved.
    at::Tensor value = reader.dequantize(t.name);
    const bool keep = only.empty() || std::find(only.begin(), only.end(), t.name) != only.end();
    if (keep) tensors.emplace_back(t.name, std::move(value));
  }
  for (const std::string& name : only) reader.tensor_info(name);  // unknown names fail
  qlora::io::save_safetensors(out, tensors);
}

int usage() {
  std::cerr << "usage: gguf_tool [--lenient] dump FILE\n"
               "       gguf_tool [--lenient] dequant FILE OUT.safetensors [NAME...]\n";
  return 2;
}

int run(std::vector<std::string> args) {
  qlora::io::GgufOpenOptions options;
  if (!args.empty() && args[0] == "--lenient") {
    options.strict_offsets = false;
    args.erase(args.begin());
  }
  if (args.size() == 2 && args[0] == "dump") {
    dump(GgufReader::open(args[1], options));
  } else if (args.size() >= 3 && args[0] == "dequant") {
    dequant(GgufReader::open(args[1], options), args[2], {args.begin() + 3, args.end()});
  } else {
    return usage();
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run({argv + 1, argv + argc});
  } catch (const c10::Error& e) {
    // what() would append a C++ backtrace meant for developers.
    std::cerr << "gguf_tool: " << e.what_without_backtrace() << '\n';
  } catch (const std::exception& e) {
    std::cerr << "gguf_tool: " << e.what() << '\n';
  }
  return 1;
}
