// Standalone driver for tests/python/test_gguf_quant_mix.py: the legacy
// block encoders (io/ggml_legacy_quants.cpp), the K-quant encoders
// (io/ggml_kquants.cpp) and the K-quant type mix (export/gguf_quant_mix.cpp),
// on raw files, without torch.
//
//   quant_mix_harness encode TYPE IN.f32 OUT.bin
//     TYPE: q4_1 q5_0 q5_1 q8_0 q4_k q5_k q6_k f16. IN holds little-endian
//     float32 values, a whole number of blocks; OUT receives the encoding.
//
//   quant_mix_harness parse NAME
//     Prints "<llama.cpp name> <general.file_type>" for an --outtype name,
//     or exits 1 when the name is not a K-quant mix.
//
//   quant_mix_harness mix NAME MANIFEST DATA.f32 TYPES.txt OUT.bin
//     MANIFEST: a first line "n_layer n_head n_head_kv", then one line per
//     tensor, in the order the tensors are written: "name n_dims ne0 numel".
//     DATA holds the tensors' float32 values back to back, in that order.
//     For each tensor the mix chooses a type (the state spans the whole
//     manifest, as in an export) and the tensor is encoded to it: TYPES
//     receives "name ggml_type offset size" per tensor, OUT the bytes
//     (offsets into OUT). Exits 3 when the mix refuses a tensor.
#include <cstdint>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "export/gguf_quant_mix.h"
#include "harness_io.h"
#include "io/ggml_kquants.h"
#include "io/ggml_legacy_quants.h"

namespace {

namespace io = qlora::io::detail;
namespace mix = qlora::exporters::detail;
using qlora::detail::GgmlCode;

using qlora::test_harness::read_floats;
using qlora::test_harness::write_bytes;

struct Encoder {
  const char* name;
  GgmlCode code;
  int64_t block;  // elements per block
  int64_t bytes;  // bytes per block
  void (*encode)(const float*, int64_t, uint8_t*);
};

// F32 and F16 are one "block" per element.
void encode_f32(const float* x, int64_t n, uint8_t* y) { std::memcpy(y, x, 4 * n); }

void encode_f16(const float* x, int64_t n, uint8_t* y) {
  for (int64_t i = 0; i < n; ++i) {
    const uint16_t h = io::kquant_fp32_to_fp16(x[i]);
    y[2 * i] = static_cast<uint8_t>(h & 0xFF);
    y[2 * i + 1] = static_cast<uint8_t>(h >> 8);
  }
}

const Encoder kEncoders[] = {
    {"f32", GgmlCode::kF32, 1, 4, encode_f32},
    {"f16", GgmlCode::kF16, 1, 2, encode_f16},
    {"q4_1", GgmlCode::kQ4_1, io::kLegacyQuantBlock, io::kQ4_1Bytes, io::quantize_q4_1},
    {"q5_0", GgmlCode::kQ5_0, io::kLegacyQuantBlock, io::kQ5_0Bytes, io::quantize_q5_0},
    {"q5_1", GgmlCode::kQ5_1, io::kLegacyQuantBlock, io::kQ5_1Bytes, io::quantize_q5_1},
    {"q8_0", GgmlCode::kQ8_0, io::kLegacyQuantBlock, io::kQ8_0Bytes, io::quantize_q8_0},
    {"q4_k", GgmlCode::kQ4_K, io::kKQuantBlock, io::kQ4KBytes, io::quantize_q4_k},
    {"q5_k", GgmlCode::kQ5_K, io::kKQuantBlock, io::kQ5KBytes, io::quantize_q5_k},
    {"q6_k", GgmlCode::kQ6_K, io::kKQuantBlock, io::kQ6KBytes, io::quantize_q6_k},
};

const Encoder* find_encoder(const std::string& name) {
  for (const Encoder& e : kEncoders)
    if (name == e.name) return &e;
  return nullptr;
}

const Encoder* find_encoder(GgmlCode code) {
  for (const Encoder& e : kEncoders)
    if (code == e.code) return &e;
  return nullptr;
}

// Appends the encoding of n values to out; false when n is not a whole
// number of blocks.
bool encode(const Encoder& e, const float* x, int64_t n, std::vector<uint8_t>* out) {
  if (n % e.block != 0) return false;
  const size_t at = out->size();
  out->resize(at + static_cast<size_t>(n / e.block * e.bytes));
  e.encode(x, n / e.block, out->data() + at);
  return true;
}

int usage() {
  std::cerr << "usage: quant_mix_harness encode TYPE IN.f32 OUT.bin\n"
               "       quant_mix_harness parse NAME\n"
               "       quant_mix_harness mix NAME MANIFEST DATA.f32 TYPES.txt OUT.bin\n";
  return 2;
}

int run_encode(const std::string& type, const std::string& in, const std::string& out) {
  const Encoder* e = find_encoder(type);
  if (e == nullptr) return usage();
  std::vector<float> x;
  if (!read_floats(in, &x)) {
    std::cerr << "quant_mix_harness: cannot read float32 values from " << in << "\n";
    return 1;
  }
  std::vector<uint8_t> y;
  if (!encode(*e, x.data(), static_cast<int64_t>(x.size()), &y)) {
    std::cerr << "quant_mix_harness: " << x.size() << " values are not whole " << type
              << " blocks\n";
    return 1;
  }
  return write_bytes(out, y.data(), y.size()) ? 0 : 1;
}

int run_parse(const std::string& name) {
  const auto m = mix::parse_kquant_mix(name);
  if (!m) return 1;
  std::cout << mix::kquant_mix_name(*m) << " " << mix::file_type_of(*m) << "\n";
  return 0;
}

struct TensorEntry {
  std::string name;
  int n_dims = 0;
  int64_t ne0 = 0;
  int64_t numel = 0;
};

int run_mix(const std::string& name, const std::string& manifest, const std::string& data,
            const std::string& types_out, const std::string& bytes_out) {
  const auto m = mix::parse_kquant_mix(name);
  if (!m) return usage();
  std::ifstream in(manifest);
  int32_t n_layer = 0, n_head = 0, n_head_kv = 0;
  if (!(in >> n_layer >> n_head >> n_head_kv)) {
    std::cerr << "quant_mix_harness: bad manifest header in " << manifest << "\n";
    return 1;
  }
  std::vector<TensorEntry> tensors;
  for (TensorEntry t; in >> t.name >> t.n_dims >> t.ne0 >> t.numel;) tensors.push_back(t);
  std::vector<float> x;
  if (!read_floats(data, &x)) {
    std::cerr << "quant_mix_harness: cannot read float32 values from " << data << "\n";
    return 1;
  }

  std::vector<std::string> names;
  for (const TensorEntry& t : tensors) names.push_back(t.name);
  mix::QuantMixState state = mix::make_quant_mix_state(n_layer, n_head, n_head_kv, names);

  std::ostringstream listing;
  std::vector<uint8_t> bytes;
  size_t pos = 0;
  for (const TensorEntry& t : tensors) {
    if (pos + static_cast<size_t>(t.numel) > x.size()) {
      std::cerr << "quant_mix_harness: " << data << " ends inside " << t.name << "\n";
      return 1;
    }
    GgmlCode type;
    try {
      type = mix::choose_type(*m, t.name, t.ne0, t.n_dims, state);
    } catch (const std::invalid_argument& err) {
      std::cerr << "quant_mix_harness: " << err.what() << "\n";
      return 3;
    }
    const Encoder* e = find_encoder(type);
    const size_t at = bytes.size();
    if (e == nullptr || !encode(*e, x.data() + pos, t.numel, &bytes)) {
      std::cerr << "quant_mix_harness: cannot encode " << t.name << " as type "
                << static_cast<int>(type) << "\n";
      return 1;
    }
    listing << t.name << " " << static_cast<int>(type) << " " << at << " " << bytes.size() - at
            << "\n";
    pos += static_cast<size_t>(t.numel);
  }
  std::ofstream out(types_out);
  out << listing.str();
  if (!out || !write_bytes(bytes_out, bytes.data(), bytes.size())) return 1;
  return 0;
}

int run(int argc, char** argv) {
  const std::vector<std::string> args(argv + 1, argv + argc);
  if (args.size() == 4 && args[0] == "encode") return run_encode(args[1], args[2], args[3]);
  if (args.size() == 2 && args[0] == "parse") return run_parse(args[1]);
  if (args.size() == 6 && args[0] == "mix") {
    return run_mix(args[1], args[2], args[3], args[4], args[5]);
  }
  return usage();
}

}  // namespace

int main(int argc, char** argv) { return run(argc, argv); }
