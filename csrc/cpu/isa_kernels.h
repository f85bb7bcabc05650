// The inner loops of the CPU kernels, one table per instruction-set level
// (kernels_portable.cpp, kernels_avx2.cpp, kernels_avx512.cpp). The ops pick
// a table once per call from qlora::cpu_capability(), so a cap set by a test
// or QLORA_CPU_CAPABILITY reaches every kernel family at once.
//
// The SIMD tables are compiled with function-level target attributes, not
// file-wide -m flags: no AVX code can leak into inline functions shared with
// the rest of the library. Every entry gives results bit-identical to the
// portable one, except `dot` (float32 sums in another order).
#pragma once

#include <cstdint>
#include <type_traits>

#include "common/dropout_hash.h"
#include "common/ggml_blocks.h"
#include "common/quant_math.h"
#include "qlora/cpu_capability.h"

namespace qlora::cpu {

// What a dequantised value becomes: code * absmax in float32, rounded once to
// the compute dtype (round to nearest even, as torch's .to()) and stored as
// that dtype or, to feed a float32 GEMM, widened back to float32.
enum class Expand : int { kF32 = 0, kBF16, kF16, kBF16AsF32, kF16AsF32 };

constexpr int64_t expand_bytes(Expand kind) {
  return kind == Expand::kBF16 || kind == Expand::kF16 ? 2 : 4;
}

// Calls f(std::integral_constant<Expand, kind>{}): a run-time kind to the
// template parameter the SIMD loops are compiled for.
template <typename F>
void with_expand_kind(Expand kind, F&& f) {
  using E = Expand;
  switch (kind) {
    case E::kF32:
      return f(std::integral_constant<E, E::kF32>{});
    case E::kBF16:
      return f(std::integral_constant<E, E::kBF16>{});
    case E::kF16:
      return f(std::integral_constant<E, E::kF16>{});
    case E::kBF16AsF32:
      return f(std::integral_constant<E, E::kBF16AsF32>{});
    case E::kF16AsF32:
      return f(std::integral_constant<E, E::kF16AsF32>{});
  }
}

struct IsaKernels {
  const char* name;
  // Max of |x| bit patterns (abs_bits) over n floats, any n.
  uint32_t (*max_abs_bits)(const float* x, int64_t n);
  // Encodes and packs one full block of n floats (n a multiple of 32) scaled
  // by inv, into n/2 bytes.
  void (*encode_pack)(const float* x, int64_t n, float inv, const detail::FourBitTables& t,
                      uint8_t* out);
  // Dequantises `blocks` whole consecutive blocks of `blocksize` elements (a
  // multiple of 32): values[code] * absmax[b], written per `kind` (see
  // Expand). A block with a NaN/inf absmax (a corrupt file) is decoded as
  // torch rounds NaN.
  void (*expand)(const uint8_t* packed, const float* absmax, int64_t blocks, int64_t blocksize,
                 const float* values, Expand kind, void* dst);
  // Float32 dot product, any n.
  float (*dot)(const float* a, const float* b, int64_t n);
  // out[i] = keeps(first + i) ? in[i] * scale : 0 for a run whose index does
  // not cross a multiple of 2^32.
  void (*dropout_run)(const float* in, float* out, int64_t n, uint64_t first,
                      const detail::DropoutKey& key);
  // Decodes `blocks` consecutive ggml blocks of `code` (block_size elements
  // in type_size bytes each, common/ggml_blocks.h), written per `kind`.
  void (*ggml_expand)(detail::GgmlCode code, const uint8_t* src, int64_t blocks, int32_t block_size,
                      int32_t type_size, Expand kind, void* dst);
};

const IsaKernels& portable_kernels();
const IsaKernels& avx2_kernels();    // only called where the CPU has AVX2 + FMA + F16C
const IsaKernels& avx512_kernels();  // only called where the CPU has AVX-512 F/BW/DQ/VL

// The table of a level (avx512_bf16 uses the AVX-512 table: what it adds is
// the bfloat16 GEMM, see dense_gemm.h), and of the level in force.
const IsaKernels& isa_kernels(CpuCapability level);
inline const IsaKernels& isa_kernels() { return isa_kernels(cpu_capability()); }

}  // namespace qlora::cpu
