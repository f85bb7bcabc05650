// Dequantisation of any element range of a 4-bit tensor, the building block
// of the dequantize, gemv and matmul CPU kernels. Full aligned blocks go
// through the level's `expand` (isa_kernels.h), the rest through the
// portable loop.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common/quant_math.h"
#include "cpu/cpu_utils.h"
#include "cpu/isa_kernels.h"

namespace qlora::cpu {

// Round: the dtype each value is rounded to (the dtype the caller computes
// in); Out: what is stored (Round itself, or float to feed a float32 GEMM
// with exactly the Round-precision weights).
template <typename Round, typename Out>
constexpr Expand expand_kind() {
  if constexpr (std::is_same_v<Round, float>) {
    static_assert(std::is_same_v<Out, float>);
    return Expand::kF32;
  } else if constexpr (std::is_same_v<Round, c10::BFloat16>) {
    return std::is_same_v<Out, float> ? Expand::kBF16AsF32 : Expand::kBF16;
  } else {
    static_assert(std::is_same_v<Round, c10::Half>);
    return std::is_same_v<Out, float> ? Expand::kF16AsF32 : Expand::kF16;
  }
}

// Writes elements [begin, end) of the flat tensor to dst[0 .. end-begin).
// Each value is the float product code * absmax rounded once to Round and
// stored as Out.
template <typename Round, typename Out>
void dequantize_range(const uint8_t* packed, const float* absmax, int64_t blocksize,
                      const detail::FourBitTables& t, int64_t begin, int64_t end, Out* dst,
                      const IsaKernels& k) {
  constexpr Expand kind = expand_kind<Round, Out>();
  auto partial = [&](int64_t from, int64_t to) {  // inside one block
    Out lut[16];
    const float scale = absmax[from / blocksize];
    for (int c = 0; c < 16; ++c) lut[c] = static_cast<Out>(round_to<Round>(t.values[c] * scale));
    for (int64_t e = from; e < to; ++e) dst[e - begin] = lut[detail::nibble_at(packed, e)];
  };
  // A leading partial block, the whole blocks in one call of the level's
  // loop (blocksizes are multiples of 32), a trailing partial block.
  int64_t i = begin;
  if (i % blocksize != 0) {
    const int64_t to = std::min(end, (i / blocksize + 1) * blocksize);
    partial(i, to);
    i = to;
  }
  const int64_t whole = (end - i) / blocksize;
  if (whole > 0) {
    k.expand(packed + i / 2, absmax + i / blocksize, whole, blocksize, t.values, kind,
             dst + (i - begin));
    i += whole * blocksize;
  }
  if (i < end) partial(i, end);
}

}  // namespace qlora::cpu
