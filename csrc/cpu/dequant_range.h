// Dequantisation of any element range of a 4-bit tensor, the building block
// of the dequantize, gemv and matmul CPU kernels. Full aligned blocks go
// through the AVX2 table expansion, the rest through the portable loop.
#pragma once

#include <algorithm>
#include <cstdint>

#include "../common/quant_math.h"
#include "cpu_utils.h"
#include "fourbit_avx2.h"

namespace qlora::cpu {

// The AVX2 table expansion works on raw 32- or 16-bit patterns.
template <typename Out>
void expand_nibbles(const uint8_t* src, int64_t nbytes, const Out* lut, Out* dst) {
  static_assert(sizeof(Out) == 4 || sizeof(Out) == 2);
  if constexpr (sizeof(Out) == 4) {
    simd::expand_nibbles_32bit_avx2(src, nbytes, reinterpret_cast<const uint32_t*>(lut),
                                    reinterpret_cast<uint32_t*>(dst));
  } else {
    simd::expand_nibbles_16bit_avx2(src, nbytes, reinterpret_cast<const uint16_t*>(lut),
                                    reinterpret_cast<uint16_t*>(dst));
  }
}

// Writes elements [begin, end) of the flat tensor to dst[0 .. end-begin).
// Each value is the float product code * absmax rounded once to Round (the
// dtype the caller computes in) and stored as Out (Round itself, or float
// to feed a float32 GEMM with exactly the Round-precision weights).
template <typename Round, typename Out>
void dequantize_range(const uint8_t* packed, const float* absmax, int64_t blocksize,
                      const detail::FourBitTables& t, int64_t begin, int64_t end, Out* dst,
                      bool avx2) {
  Out lut[16];
  for (int64_t i = begin; i < end;) {
    const int64_t block = i / blocksize;
    const int64_t seg_end = std::min(end, (block + 1) * blocksize);
    for (int k = 0; k < 16; ++k)
      lut[k] = static_cast<Out>(round_to<Round>(t.values[k] * absmax[block]));
    Out* out = dst + (i - begin);
    if (avx2 && i == block * blocksize && seg_end == i + blocksize) {
      expand_nibbles(packed + i / 2, blocksize / 2, lut, out);  // blocksize/2 is a multiple of 16
    } else {
      for (int64_t e = i; e < seg_end; ++e) out[e - i] = lut[detail::nibble_at(packed, e)];
    }
    i = seg_end;
  }
}

}  // namespace qlora::cpu
