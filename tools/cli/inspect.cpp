#include "inspect.h"

#include <cstring>
#include <fstream>
#include <map>
#include <stdexcept>

#include "qlora/io/gguf.h"
#include "qlora/io/qnat_file.h"
#include "qlora/io/safetensors.h"

namespace qlora::cli {

namespace {

std::string magic_of(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  char m[4] = {0, 0, 0, 0};
  in.read(m, 4);
  return std::string(m, 4);
}

int inspect_gguf(const std::string& path, std::ostream& out) {
  const auto r = io::GgufReader::open(path);
  out << path << ": GGUF v" << r.version() << ", " << r.keys().size() << " keys, "
      << r.tensors().size() << " tensors, alignment " << r.alignment() << "\n";
  for (const auto& key : r.keys()) {
    const auto& v = r.get(key);
    out << "  " << key << " = " << v.to_string(8) << "\n";
  }
  std::map<std::string, int64_t> by_type;
  uint64_t bytes = 0;
  for (const auto& t : r.tensors()) {
    by_type[io::ggml_type_name(t.type)]++;
    bytes += t.nbytes;
  }
  out << "  tensor types:";
  for (const auto& [type, n] : by_type) out << " " << type << "x" << n;
  out << ", " << bytes << " bytes of tensor data\n";
  return 0;
}

int inspect_safetensors(const std::string& path, std::ostream& out) {
  const auto r = io::SafetensorsReader::open(path);
  int64_t bytes = 0;
  for (const auto& t : r.tensors()) bytes += static_cast<int64_t>(t.end - t.begin);
  out << path << ": safetensors, " << r.tensors().size() << " tensors, " << bytes << " bytes\n";
  for (const auto& [k, v] : r.metadata()) out << "  metadata " << k << " = " << v << "\n";
  for (const auto& t : r.tensors())
    out << "  " << t.name << " " << io::safetensors_dtype_name(t.dtype) << " "
        << at::IntArrayRef(t.shape) << "\n";
  return 0;
}

int inspect_qnat(const std::string& path, std::ostream& out) {
  const auto f = io::QnatFile::open(path);
  out << path << ": QNAT, " << f.tensors().size() << " tensors, adapter "
      << (f.has_adapter() ? "included" : "not included") << ", checksums verified\n";
  for (const auto& t : f.tensors())
    out << "  " << t.name << " " << at::IntArrayRef(t.shape) << "\n";
  return 0;
}

}  // namespace

int inspect(const std::string& path, std::ostream& out) {
  const std::string magic = magic_of(path);
  if (magic == "GGUF") return inspect_gguf(path, out);
  if (magic == "QNAT") return inspect_qnat(path, out);
  if (path.size() > 12 && path.compare(path.size() - 12, 12, ".safetensors") == 0)
    return inspect_safetensors(path, out);
  throw std::runtime_error(path + ": not a GGUF, QNAT or .safetensors file");
}

}  // namespace qlora::cli
