// AVX2 inner loops of the 4-bit CPU kernels. Each function is compiled for
// AVX2 through a function-level target attribute (not a file-wide -mavx2, so
// no AVX2 code can leak into shared inline functions) and is only called
// when the running CPU has AVX2. Results are bit-identical to the portable
// loops; tests run both paths.
#pragma once

#include <cstdint>

#include "../common/quant_math.h"

namespace qlora::cpu::simd {

// True when the CPU has AVX2 and QLORA_CPU_SIMD is not "0"; tests may
// switch it off to compare against the portable loops.
bool avx2_enabled();
void set_avx2_enabled(bool enabled);

// Max of |x| bit patterns over n floats (n a multiple of 8).
uint32_t max_abs_bits_avx2(const float* x, int64_t n);

// Encodes and packs a full block: n floats (a multiple of 32) scaled by inv,
// written as n/2 bytes.
void encode_pack_avx2(const float* x, int64_t n, float inv, const detail::FourBitTables& t,
                      uint8_t* out);

// Expands nbytes packed bytes (a multiple of 16) through a 16-entry table of
// 32-bit or 16-bit values (the block's code values times its absmax,
// already rounded to the output dtype).
void expand_nibbles_32bit_avx2(const uint8_t* src, int64_t nbytes, const uint32_t* lut,
                               uint32_t* dst);
void expand_nibbles_16bit_avx2(const uint8_t* src, int64_t nbytes, const uint16_t* lut,
                               uint16_t* dst);

// Float32 dot product with FMA (any n).
float dot_avx2(const float* a, const float* b, int64_t n);

}  // namespace qlora::cpu::simd
