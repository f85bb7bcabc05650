// The AVX2 level of isa_kernels.h (AVX2 + FMA + F16C), bit-identical to the
// portable table except for the order of `dot`'s sums.
#include <algorithm>

#include "cpu/ggml_expand.h"
#include "cpu/isa_kernels.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define QLORA_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace qlora::cpu {
namespace {

QLORA_AVX2 uint32_t hmax_epu32(__m256i v) {
  __m128i m = _mm_max_epu32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  m = _mm_max_epu32(m, _mm_shuffle_epi32(m, _MM_SHUFFLE(1, 0, 3, 2)));
  m = _mm_max_epu32(m, _mm_shuffle_epi32(m, _MM_SHUFFLE(2, 3, 0, 1)));
  return static_cast<uint32_t>(_mm_cvtsi128_si32(m));
}

QLORA_AVX2 uint32_t max_abs_bits(const float* x, int64_t n) {
  const __m256i abs_mask = _mm256_set1_epi32(0x7FFFFFFF);
  __m256i m = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i));
    m = _mm256_max_epu32(m, _mm256_and_si256(bits, abs_mask));
  }
  uint32_t r = hmax_epu32(m);
  for (; i < n; ++i) r = std::max(r, detail::abs_bits(x[i]));
  return r;
}

// Codes of 8 normalised values: the count of bounds strictly below each
// (ties go down, as bucketize), then the value-rank -> code map for FP4.
QLORA_AVX2 __m256i encode8(__m256 v, const __m256* bounds, __m256i order_lo, __m256i order_hi,
                           bool remap) {
  __m256i rank = _mm256_setzero_si256();
  for (int i = 0; i < 15; ++i)
    rank = _mm256_sub_epi32(rank, _mm256_castps_si256(_mm256_cmp_ps(v, bounds[i], _CMP_GT_OQ)));
  if (!remap) return rank;
  const __m256i lo = _mm256_permutevar8x32_epi32(order_lo, rank);
  const __m256i hi = _mm256_permutevar8x32_epi32(order_hi, rank);
  return _mm256_blendv_epi8(lo, hi, _mm256_cmpgt_epi32(rank, _mm256_set1_epi32(7)));
}

QLORA_AVX2 void encode_pack(const float* x, int64_t n, float inv, const detail::FourBitTables& t,
                            uint8_t* out) {
  __m256 bounds[15];
  for (int i = 0; i < 15; ++i) bounds[i] = _mm256_set1_ps(t.bounds[i]);
  alignas(32) int32_t order[16];
  bool remap = false;
  for (int i = 0; i < 16; ++i) {
    order[i] = t.order[i];
    remap |= t.order[i] != i;
  }
  const __m256i order_lo = _mm256_load_si256(reinterpret_cast<const __m256i*>(order));
  const __m256i order_hi = _mm256_load_si256(reinterpret_cast<const __m256i*>(order + 8));
  const __m256 scale = _mm256_set1_ps(inv), one = _mm256_set1_ps(1.f),
               minus_one = _mm256_set1_ps(-1.f);
  const __m256i dword_order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t i = 0; i < n; i += 32) {
    __m256i codes[4];
    for (int g = 0; g < 4; ++g) {
      __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + i + 8 * g), scale);
      v = _mm256_min_ps(_mm256_max_ps(v, minus_one), one);  // inputs are finite
      codes[g] = encode8(v, bounds, order_lo, order_hi, remap);
    }
    // 32 codes (one per dword) -> 32 bytes in element order.
    const __m256i p01 = _mm256_packus_epi32(codes[0], codes[1]);
    const __m256i p23 = _mm256_packus_epi32(codes[2], codes[3]);
    const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(p01, p23), dword_order);
    // Pairs -> (even << 4) | odd in the low byte of each 16-bit word.
    const __m256i pairs =
        _mm256_or_si256(_mm256_and_si256(_mm256_slli_epi16(bytes, 4), _mm256_set1_epi16(0x00F0)),
                        _mm256_srli_epi16(bytes, 8));
    const __m256i packed =
        _mm256_permute4x64_epi64(_mm256_packus_epi16(pairs, pairs), _MM_SHUFFLE(3, 1, 2, 0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i / 2), _mm256_castsi256_si128(packed));
  }
}

// bfloat16 bits (in the low half of each dword) of 8 finite floats, rounded
// to nearest even: what c10::BFloat16(float) computes for non-NaN values.
QLORA_AVX2 __m256i bf16_bits(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  return _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)), lsb),
                           16);
}

// Elements 8g..8g+7 of a 32-element group as float32 values: nibble
// indices widened to dwords, a 16-entry lookup as two 8-entry permutes
// selected by index bit 3, times absmax.
QLORA_AVX2 __m256 values8(__m128i nibbles, __m256 lo_tab, __m256 hi_tab, __m256 scale) {
  const __m256i idx = _mm256_cvtepu8_epi32(nibbles);
  const __m256 lo = _mm256_permutevar8x32_ps(lo_tab, idx);  // uses index bits 2..0
  const __m256 hi = _mm256_permutevar8x32_ps(hi_tab, idx);
  const __m256 v = _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
  return _mm256_mul_ps(v, scale);
}

// The 16 possible values of a block, rounded to 16 bits (bfloat16 or
// float16 bits), as two byte tables duplicated in both 128-bit lanes: byte 0
// and byte 1 of every entry, for vpshufb lookups by nibble.
template <Expand K>
QLORA_AVX2 void tables16(__m256 lo_tab, __m256 hi_tab, __m256 scale, __m256i tables[2]) {
  const __m256 a = _mm256_mul_ps(lo_tab, scale), b = _mm256_mul_ps(hi_tab, scale);
  __m256i entries;  // entries 0..7 in lane 0, 8..15 in lane 1
  if constexpr (K == Expand::kBF16) {
    entries = _mm256_permute4x64_epi64(_mm256_packus_epi32(bf16_bits(a), bf16_bits(b)),
                                       _MM_SHUFFLE(3, 1, 2, 0));
  } else {
    entries = _mm256_set_m128i(_mm256_cvtps_ph(b, _MM_FROUND_TO_NEAREST_INT),
                               _mm256_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT));
  }
  const __m256i gather = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15, 0,
                                          2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  const __m256i g = _mm256_shuffle_epi8(entries, gather);
  const __m128i l = _mm256_castsi256_si128(g), h = _mm256_extracti128_si256(g, 1);
  tables[0] = _mm256_broadcastsi128_si256(_mm_unpacklo_epi64(l, h));
  tables[1] = _mm256_broadcastsi128_si256(_mm_unpackhi_epi64(l, h));
}

// 16 packed bytes -> 32 nibble indices in element order (lane 0: elements
// 0..15, lane 1: 16..31), the even element's high nibble first.
QLORA_AVX2 __m256i nibble_indices(const uint8_t* src) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
  const __m128i lo = _mm_and_si128(v, mask);
  return _mm256_set_m128i(_mm_unpackhi_epi8(hi, lo), _mm_unpacklo_epi8(hi, lo));
}

// 16-bit outputs: a table per block, then two byte lookups per 32 elements
// (cheaper than converting every element on AVX2).
template <Expand K>
QLORA_AVX2 void expand16(const uint8_t* packed, int64_t blocksize, __m256 lo_tab, __m256 hi_tab,
                         float absmax, uint16_t* out) {
  __m256i tables[2];
  tables16<K>(lo_tab, hi_tab, _mm256_set1_ps(absmax), tables);
  for (int64_t j = 0; j < blocksize / 2; j += 16, out += 32) {
    const __m256i idx = nibble_indices(packed + j);
    const __m256i b0 = _mm256_shuffle_epi8(tables[0], idx),
                  b1 = _mm256_shuffle_epi8(tables[1], idx);
    const __m256i lo = _mm256_unpacklo_epi8(b0, b1);  // elements 0..7 | 16..23
    const __m256i hi = _mm256_unpackhi_epi8(b0, b1);  // 8..15 | 24..31
    auto* dst = reinterpret_cast<__m256i*>(out);
    _mm256_storeu_si256(dst + 0, _mm256_permute2x128_si256(lo, hi, 0x20));
    _mm256_storeu_si256(dst + 1, _mm256_permute2x128_si256(lo, hi, 0x31));
  }
}

// One whole block per call of the inner loop; the kind is a template
// parameter so the loop carries no switch.
template <Expand K>
QLORA_AVX2 void expand_as(const uint8_t* packed, const float* absmax, int64_t blocks,
                          int64_t blocksize, const float* values, void* dst) {
  const __m256 lo_tab = _mm256_loadu_ps(values), hi_tab = _mm256_loadu_ps(values + 8);
  const __m128i low4 = _mm_set1_epi8(0x0F);
  auto* out_bytes = static_cast<char*>(dst);
  for (int64_t blk = 0; blk < blocks; ++blk, packed += blocksize / 2) {
    void* out_block = out_bytes + blk * blocksize * expand_bytes(K);
    if (detail::abs_bits(absmax[blk]) >= detail::kNonFiniteBits) {
      portable_kernels().expand(packed, absmax + blk, 1, blocksize, values, K, out_block);
      continue;
    }
    if constexpr (K == Expand::kBF16 || K == Expand::kF16) {
      expand16<K>(packed, blocksize, lo_tab, hi_tab, absmax[blk],
                  static_cast<uint16_t*>(out_block));
      continue;
    }
    const __m256 scale = _mm256_set1_ps(absmax[blk]);
    for (int64_t i = 0; i < blocksize; i += 32) {
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + i / 2));
      const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4);
      // Element order: high nibble of byte 0, its low nibble, byte 1, ... The
      // low nibbles keep their high bits: the lookups only read bits 3..0.
      const __m128i e0 = _mm_unpacklo_epi8(hi, b), e1 = _mm_unpackhi_epi8(hi, b);
      const __m256 v[4] = {values8(e0, lo_tab, hi_tab, scale),
                           values8(_mm_srli_si128(e0, 8), lo_tab, hi_tab, scale),
                           values8(e1, lo_tab, hi_tab, scale),
                           values8(_mm_srli_si128(e1, 8), lo_tab, hi_tab, scale)};
      if constexpr (K == Expand::kF32 || K == Expand::kBF16AsF32 || K == Expand::kF16AsF32) {
        float* out = static_cast<float*>(out_block) + i;
        for (int g = 0; g < 4; ++g) {
          __m256 r = v[g];
          if constexpr (K == Expand::kBF16AsF32)
            r = _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits(v[g]), 16));
          if constexpr (K == Expand::kF16AsF32)
            r = _mm256_cvtph_ps(_mm256_cvtps_ph(v[g], _MM_FROUND_TO_NEAREST_INT));
          _mm256_storeu_ps(out + 8 * g, r);
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

QLORA_AVX2 float dot(const float* a, const float* b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  const __m256 acc = _mm256_add_ps(acc0, acc1);
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  float sum = _mm_cvtss_f32(s);
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

QLORA_AVX2 __m256i mix32(__m256i x) {
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x7feb352d));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(static_cast<int>(0x846ca68bU)));
  return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
}

QLORA_AVX2 void dropout_run(const float* in, float* out, int64_t n, uint64_t first,
                            const detail::DropoutKey& key) {
  const uint32_t lo0 = static_cast<uint32_t>(first);
  const __m256i hi =
      _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(first >> 32) ^ key.k1));
  const __m256i k0 = _mm256_set1_epi32(static_cast<int>(key.k0));
  const __m256i threshold = _mm256_set1_epi32(static_cast<int>(key.threshold));
  const __m256 scale = _mm256_set1_ps(key.scale);
  __m256i idx = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(lo0)),
                                 _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i h = mix32(_mm256_add_epi32(mix32(_mm256_xor_si256(idx, k0)), hi));
    // Unsigned h >= threshold  <=>  max(h, threshold) == h.
    const __m256i keep = _mm256_cmpeq_epi32(_mm256_max_epu32(h, threshold), h);
    const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(in + i), scale);
    _mm256_storeu_ps(out + i, _mm256_and_ps(v, _mm256_castsi256_ps(keep)));
    idx = _mm256_add_epi32(idx, _mm256_set1_epi32(8));
  }
  if (i < n)
    portable_kernels().dropout_run(in + i, out + i, n - i, first + static_cast<uint64_t>(i), key);
}

QLORA_AVX2 void ggml_expand(detail::GgmlCode code, const uint8_t* src, int64_t blocks,
                            int32_t block_size, int32_t type_size, Expand kind, void* dst) {
  ggml_expand_body(code, src, blocks, block_size, type_size, kind, dst);
}

}  // namespace

const IsaKernels& avx2_kernels() {
  static const IsaKernels k{"avx2", max_abs_bits, encode_pack, expand,
                            dot,    dropout_run,  ggml_expand};
  return k;
}

}  // namespace qlora::cpu

#else  // not x86-64: the level is never detected, the portable table stands in

namespace qlora::cpu {
const IsaKernels& avx2_kernels() { return portable_kernels(); }
}  // namespace qlora::cpu

#endif
