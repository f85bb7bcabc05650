// The portable level of isa_kernels.h: plain loops over the shared
// per-element rules of common/, the reference the SIMD levels are tested
// against, and the code that runs on any x86-64 (or other) CPU.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>

#include "cpu/ggml_expand.h"
#include "cpu/isa_kernels.h"

namespace qlora::cpu {
namespace {

uint32_t max_abs_bits(const float* x, int64_t n) {
  uint32_t m = 0;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, detail::abs_bits(x[i]));
  return m;
}

void encode_pack(const float* x, int64_t n, float inv, const detail::FourBitTables& t,
                 uint8_t* out) {
  for (int64_t j = 0; j < n / 2; ++j) {
    const uint8_t even = detail::encode_4bit(detail::normalise_full(x[2 * j], inv), t);
    const uint8_t odd = detail::encode_4bit(detail::normalise_full(x[2 * j + 1], inv), t);
    out[j] = detail::pack_pair(even, odd);
  }
}

// A block's 16 possible values are rounded once into a table, then each
// element is a lookup.
template <typename Out, typename Round>
void expand_as(const uint8_t* packed, const float* absmax, int64_t blocks, int64_t blocksize,
               const float* values, void* dst) {
  Out* out = static_cast<Out*>(dst);
  for (int64_t b = 0; b < blocks; ++b) {
    Out lut[16];
    for (int k = 0; k < 16; ++k)
      lut[k] = static_cast<Out>(static_cast<Round>(values[k] * absmax[b]));
    const uint8_t* src = packed + b * blocksize / 2;
    for (int64_t e = 0; e < blocksize; ++e) out[b * blocksize + e] = lut[detail::nibble_at(src, e)];
  }
}

void expand(const uint8_t* packed, const float* absmax, int64_t blocks, int64_t blocksize,
            const float* values, Expand kind, void* dst) {
  switch (kind) {
    case Expand::kF32:
      return expand_as<float, float>(packed, absmax, blocks, blocksize, values, dst);
    case Expand::kBF16:
      return expand_as<c10::BFloat16, c10::BFloat16>(packed, absmax, blocks, blocksize, values,
                                                     dst);
    case Expand::kF16:
      return expand_as<c10::Half, c10::Half>(packed, absmax, blocks, blocksize, values, dst);
    case Expand::kBF16AsF32:
      return expand_as<float, c10::BFloat16>(packed, absmax, blocks, blocksize, values, dst);
    case Expand::kF16AsF32:
      return expand_as<float, c10::Half>(packed, absmax, blocks, blocksize, values, dst);
  }
}

float dot(const float* a, const float* b, int64_t n) {
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  int64_t i = 0;
  for (; i + 4 <= n; i += 4)
    for (int k = 0; k < 4; ++k) acc[k] += a[i + k] * b[i + k];
  for (; i < n; ++i) acc[0] += a[i] * b[i];
  return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

void dropout_run(const float* in, float* out, int64_t n, uint64_t first,
                 const detail::DropoutKey& key) {
  // The index's high word is constant within the run: hoisted.
  const uint32_t lo0 = static_cast<uint32_t>(first);
  const uint32_t hi = static_cast<uint32_t>(first >> 32) ^ key.k1;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t h = detail::mix32(detail::mix32((lo0 + static_cast<uint32_t>(i)) ^ key.k0) + hi);
    out[i] = h >= key.threshold ? in[i] * key.scale : 0.0f;
  }
}

void ggml_expand(detail::GgmlCode code, const uint8_t* src, int64_t blocks, int32_t block_size,
                 int32_t type_size, Expand kind, void* dst) {
  ggml_expand_body(code, src, blocks, block_size, type_size, kind, dst);
}

}  // namespace

const IsaKernels& portable_kernels() {
  static const IsaKernels k{"portable", max_abs_bits, encode_pack, expand,
                            dot,        dropout_run,  ggml_expand};
  return k;
}

const IsaKernels& isa_kernels(CpuCapability level) {
  // Never above what the CPU has, whoever asks.
  if (static_cast<int>(level) > static_cast<int>(detected_cpu_capability()))
    level = detected_cpu_capability();
  switch (level) {
    case CpuCapability::kPortable:
      return portable_kernels();
    case CpuCapability::kAvx2:
      return avx2_kernels();
    case CpuCapability::kAvx512:
    case CpuCapability::kAvx512Bf16:
      return avx512_kernels();
  }
  return portable_kernels();
}

}  // namespace qlora::cpu
