// The AVX-512 level of isa_kernels.h (F, BW, DQ, VL): 16 lanes, 16-entry
// lookups in one permute, mask registers for the bucket counts. Bit-identical
// to the portable table except for the order of `dot`'s sums. bfloat16 is
// rounded with integer arithmetic even where AVX512-BF16 exists: its
// vcvtneps2bf16 flushes subnormals, torch's rounding does not.
#include <algorithm>

#include "cpu/ggml_expand.h"
#include "cpu/isa_kernels.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define QLORA_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")))
// GCC 12's own avx512fintrin.h builds "undefined" vectors by self-assignment
// (__m512 __Y = __Y), which its flow analysis then reports once inlined here.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace qlora::cpu {
namespace {

QLORA_AVX512 uint32_t max_abs_bits(const float* x, int64_t n) {
  const __m512i abs_mask = _mm512_set1_epi32(0x7FFFFFFF);
  __m512i m = _mm512_setzero_si512();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    m = _mm512_max_epu32(m, _mm512_and_si512(_mm512_loadu_si512(x + i), abs_mask));
  if (i < n) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (n - i)) - 1);
    m = _mm512_max_epu32(m, _mm512_and_si512(_mm512_maskz_loadu_epi32(tail, x + i), abs_mask));
  }
  return _mm512_reduce_max_epu32(m);
}

// Codes of 16 normalised values: bounds strictly below each, counted in
// mask registers (ties go down, as bucketize), then rank -> code.
QLORA_AVX512 __m512i encode16(__m512 v, const __m512* bounds, __m512i order, bool remap) {
  __m512i rank = _mm512_setzero_si512();
  const __m512i one = _mm512_set1_epi32(1);
  for (int i = 0; i < 15; ++i)
    rank = _mm512_mask_add_epi32(rank, _mm512_cmp_ps_mask(v, bounds[i], _CMP_GT_OQ), rank, one);
  return remap ? _mm512_permutexvar_epi32(rank, order) : rank;
}

QLORA_AVX512 void encode_pack(const float* x, int64_t n, float inv, const detail::FourBitTables& t,
                              uint8_t* out) {
  __m512 bounds[15];
  for (int i = 0; i < 15; ++i) bounds[i] = _mm512_set1_ps(t.bounds[i]);
  alignas(64) int32_t order[16];
  bool remap = false;
  for (int i = 0; i < 16; ++i) {
    order[i] = t.order[i];
    remap |= t.order[i] != i;
  }
  const __m512i order_v = _mm512_load_si512(order);
  const __m512 scale = _mm512_set1_ps(inv), one = _mm512_set1_ps(1.f),
               minus_one = _mm512_set1_ps(-1.f);
  for (int64_t i = 0; i < n; i += 32) {
    __m128i bytes[2];
    for (int g = 0; g < 2; ++g) {
      __m512 v = _mm512_mul_ps(_mm512_loadu_ps(x + i + 16 * g), scale);
      v = _mm512_min_ps(_mm512_max_ps(v, minus_one), one);  // inputs are finite
      bytes[g] = _mm512_cvtepi32_epi8(encode16(v, bounds, order_v, remap));
    }
    // Byte pairs (even, odd) as 16-bit words -> (even << 4) | odd.
    const __m256i w = _mm256_set_m128i(bytes[1], bytes[0]);
    const __m256i pairs =
        _mm256_or_si256(_mm256_and_si256(_mm256_slli_epi16(w, 4), _mm256_set1_epi16(0x00F0)),
                        _mm256_srli_epi16(w, 8));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i / 2), _mm256_cvtepi16_epi8(pairs));
  }
}

// bfloat16 bits of 16 finite floats, rounded to nearest even (as
// c10::BFloat16(float) for non-NaN values), in the low half of each dword.
QLORA_AVX512 __m512i bf16_bits(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  return _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7FFF)), lsb),
                           16);
}

// One whole block per call of the inner loop; the kind is a template
// parameter so the loop carries no switch.
template <Expand K>
QLORA_AVX512 void expand_as(const uint8_t* packed, const float* absmax, int64_t blocks,
                            int64_t blocksize, const float* values, void* dst) {
  const __m512 table = _mm512_loadu_ps(values);
  const __m128i low4 = _mm_set1_epi8(0x0F);
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  auto* out_bytes = static_cast<char*>(dst);
  for (int64_t blk = 0; blk < blocks; ++blk, packed += blocksize / 2) {
    void* out_block = out_bytes + blk * blocksize * expand_bytes(K);
    if (detail::abs_bits(absmax[blk]) >= detail::kNonFiniteBits) {
      portable_kernels().expand(packed, absmax + blk, 1, blocksize, values, K, out_block);
      continue;
    }
    const __m512 scale = _mm512_set1_ps(absmax[blk]);
    for (int64_t i = 0; i < blocksize; i += 32) {
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + i / 2));
      const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4);
      // Element order: high nibble first; the low nibbles keep their high
      // bits, the permute reads index bits 3..0 only.
      const __m512 v[2] = {
          _mm512_mul_ps(
              _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(hi, b)), table), scale),
          _mm512_mul_ps(
              _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpackhi_epi8(hi, b)), table), scale)};
      for (int g = 0; g < 2; ++g) {
        if constexpr (K == Expand::kF32) {
          _mm512_storeu_ps(static_cast<float*>(out_block) + i + 16 * g, v[g]);
        } else if constexpr (K == Expand::kBF16AsF32) {
          _mm512_storeu_si512(static_cast<float*>(out_block) + i + 16 * g,
                              _mm512_slli_epi32(bf16_bits(v[g]), 16));
        } else if constexpr (K == Expand::kF16AsF32) {
          _mm512_storeu_ps(static_cast<float*>(out_block) + i + 16 * g,
                           _mm512_cvtph_ps(_mm512_cvtps_ph(v[g], kRound)));
        } else if constexpr (K == Expand::kBF16) {
          _mm256_storeu_si256(
              reinterpret_cast<__m256i*>(static_cast<uint16_t*>(out_block) + i + 16 * g),
              _mm512_cvtepi32_epi16(bf16_bits(v[g])));
        } else {
          _mm256_storeu_si256(
              reinterpret_cast<__m256i*>(static_cast<uint16_t*>(out_block) + i + 16 * g),
              _mm512_cvtps_ph(v[g], kRound));
        }
      }
    }
  }
}

void expand(const uint8_t* packed, const float* absmax, int64_t blocks, int64_t blocksize,
            const float* values, Expand kind, void* dst) {
  with_expand_kind(kind, [&](auto k) {
    expand_as<decltype(k)::value>(packed, absmax, blocks, blocksize, values, dst);
  });
}

QLORA_AVX512 float dot(const float* a, const float* b, int64_t n) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc0);
    acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), acc1);
  }
  for (; i + 16 <= n; i += 16)
    acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc0);
  if (i < n) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (n - i)) - 1);
    acc1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, a + i), _mm512_maskz_loadu_ps(tail, b + i),
                           acc1);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

QLORA_AVX512 __m512i mix32(__m512i x) {
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(0x7feb352d));
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(static_cast<int>(0x846ca68bU)));
  return _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
}

QLORA_AVX512 void dropout_run(const float* in, float* out, int64_t n, uint64_t first,
                              const detail::DropoutKey& key) {
  const uint32_t lo0 = static_cast<uint32_t>(first);
  const __m512i hi =
      _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(first >> 32) ^ key.k1));
  const __m512i k0 = _mm512_set1_epi32(static_cast<int>(key.k0));
  const __m512i threshold = _mm512_set1_epi32(static_cast<int>(key.threshold));
  const __m512 scale = _mm512_set1_ps(key.scale);
  __m512i idx =
      _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(lo0)),
                       _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512i h = mix32(_mm512_add_epi32(mix32(_mm512_xor_si512(idx, k0)), hi));
    const __mmask16 keep = _mm512_cmpge_epu32_mask(h, threshold);
    _mm512_storeu_ps(out + i, _mm512_maskz_mul_ps(keep, _mm512_loadu_ps(in + i), scale));
    idx = _mm512_add_epi32(idx, _mm512_set1_epi32(16));
  }
  if (i < n)
    portable_kernels().dropout_run(in + i, out + i, n - i, first + static_cast<uint64_t>(i), key);
}

QLORA_AVX512 void ggml_expand(detail::GgmlCode code, const uint8_t* src, int64_t blocks,
                              int32_t block_size, int32_t type_size, Expand kind, void* dst) {
  ggml_expand_body(code, src, blocks, block_size, type_size, kind, dst);
}

}  // namespace

const IsaKernels& avx512_kernels() {
  static const IsaKernels k{"avx512", max_abs_bits, encode_pack, expand,
                            dot,      dropout_run,  ggml_expand};
  return k;
}

}  // namespace qlora::cpu

#else  // not x86-64: the level is never detected, the portable table stands in

namespace qlora::cpu {
const IsaKernels& avx512_kernels() { return portable_kernels(); }
}  // namespace qlora::cpu

#endif
