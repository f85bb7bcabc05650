// Standalone driver for tests/python/test_kquant_encoders.py: our K-quant
// encoders (io/ggml_kquants.cpp) on raw float32 files, without torch.
//   kquant_harness q4_k|q5_k|q6_k IN.f32 OUT.bin [DECODED.f32]
//   kquant_harness f16 IN.f32 OUT.bin
// IN holds little-endian float32 values (a multiple of 256 for the K
// types); OUT receives the encoded blocks, or one half per value for f16.
// DECODED, when given, receives OUT decoded again by common/ggml_blocks.h,
// the decoders the GGUF reader and kernels use.
#include <cstdint>
#include <iostream>
#include <string>
#include <vector>

#include "common/ggml_blocks.h"
#include "harness_io.h"
#include "io/ggml_kquants.h"

namespace {

namespace io = qlora::io::detail;
namespace blocks = qlora::detail;

using qlora::test_harness::read_floats;
using qlora::test_harness::write_bytes;

int usage() {
  std::cerr << "usage: kquant_harness q4_k|q5_k|q6_k IN.f32 OUT.bin [DECODED.f32]\n"
               "       kquant_harness f16 IN.f32 OUT.bin\n";
  return 2;
}

int run(int argc, char** argv) {
  if (argc != 4 && argc != 5) return usage();
  const std::string type = argv[1];
  std::vector<float> x;
  if (!read_floats(argv[2], &x)) {
    std::cerr << "kquant_harness: cannot read float32 values from " << argv[2] << "\n";
    return 1;
  }

  if (type == "f16") {
    if (argc != 4) return usage();
    std::vector<uint8_t> out(2 * x.size());
    for (size_t i = 0; i < x.size(); ++i) {
      const uint16_t h = io::kquant_fp32_to_fp16(x[i]);
      out[2 * i] = static_cast<uint8_t>(h & 0xFF);
      out[2 * i + 1] = static_cast<uint8_t>(h >> 8);
    }
    return write_bytes(argv[3], out.data(), out.size()) ? 0 : 1;
  }

  struct Encoder {
    const char* name;
    void (*encode)(const float*, int64_t, uint8_t*);
    blocks::GgmlCode code;
    int64_t type_size;
  };
  static const Encoder kEncoders[] = {
      {"q4_k", io::quantize_q4_k, blocks::GgmlCode::kQ4_K, io::kQ4KBytes},
      {"q5_k", io::quantize_q5_k, blocks::GgmlCode::kQ5_K, io::kQ5KBytes},
      {"q6_k", io::quantize_q6_k, blocks::GgmlCode::kQ6_K, io::kQ6KBytes},
  };
  const Encoder* enc = nullptr;
  for (const Encoder& e : kEncoders)
    if (type == e.name) enc = &e;
  if (enc == nullptr) return usage();
  if (x.size() % io::kKQuantBlock != 0) {
    std::cerr << "kquant_harness: " << x.size() << " values is not a whole number of blocks\n";
    return 1;
  }
  const int64_t n_blocks = static_cast<int64_t>(x.size()) / io::kKQuantBlock;
  std::vector<uint8_t> out(static_cast<size_t>(n_blocks * enc->type_size));
  enc->encode(x.data(), n_blocks, out.data());
  if (!write_bytes(argv[3], out.data(), out.size())) return 1;
  if (argc == 5) {
    std::vector<float> y(x.size());
    blocks::ggml_decode_blocks(enc->code, out.data(), n_blocks, y.data());
    if (!write_bytes(argv[4], y.data(), y.size() * sizeof(float))) return 1;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) { return run(argc, argv); }
