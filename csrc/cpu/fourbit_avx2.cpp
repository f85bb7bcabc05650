#include "fourbit_avx2.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define QLORA_AVX2 __attribute__((target("avx2,fma")))
#define QLORA_HAVE_AVX2_CODE 1
#endif

namespace qlora::cpu::simd {

namespace {
bool detect_avx2() {
#if defined(QLORA_HAVE_AVX2_CODE)
  const char* env = std::getenv("QLORA_CPU_SIMD");
  if (env && std::strcmp(env, "0") == 0) return false;
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}
std::atomic<bool>& avx2_flag() {
  static std::atomic<bool> flag{detect_avx2()};
  return flag;
}
}  // namespace

bool avx2_enabled() { return avx2_flag().load(std::memory_order_relaxed); }
void set_avx2_enabled(bool enabled) { avx2_flag().store(enabled && detect_avx2()); }

#if defined(QLORA_HAVE_AVX2_CODE)

namespace {

QLORA_AVX2 uint32_t hmax_epu32(__m256i v) {
  __m128i m = _mm_max_epu32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  m = _mm_max_epu32(m, _mm_shuffle_epi32(m, _MM_SHUFFLE(1, 0, 3, 2)));
  m = _mm_max_epu32(m, _mm_shuffle_epi32(m, _MM_SHUFFLE(2, 3, 0, 1)));
  return static_cast<uint32_t>(_mm_cvtsi128_si32(m));
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

// Byte tables of a 16-entry lookup, each duplicated in both 128-bit lanes so
// vpshufb can index them with nibbles: table k holds byte k of every entry.
QLORA_AVX2 void byte_tables_32(const uint32_t* lut, __m256i tables[4]) {
  const __m128i gather = _mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  __m128i q[4];
  for (int i = 0; i < 4; ++i)
    q[i] = _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(lut + 4 * i)), gather);
  const __m128i lo01 = _mm_unpacklo_epi32(q[0], q[1]), lo23 = _mm_unpacklo_epi32(q[2], q[3]);
  const __m128i hi01 = _mm_unpackhi_epi32(q[0], q[1]), hi23 = _mm_unpackhi_epi32(q[2], q[3]);
  tables[0] = _mm256_broadcastsi128_si256(_mm_unpacklo_epi64(lo01, lo23));
  tables[1] = _mm256_broadcastsi128_si256(_mm_unpackhi_epi64(lo01, lo23));
  tables[2] = _mm256_broadcastsi128_si256(_mm_unpacklo_epi64(hi01, hi23));
  tables[3] = _mm256_broadcastsi128_si256(_mm_unpackhi_epi64(hi01, hi23));
}

QLORA_AVX2 void byte_tables_16(const uint16_t* lut, __m256i tables[2]) {
  const __m128i gather = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  const __m128i a =
      _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(lut)), gather);
  const __m128i b =
      _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(lut + 8)), gather);
  tables[0] = _mm256_broadcastsi128_si256(_mm_unpacklo_epi64(a, b));
  tables[1] = _mm256_broadcastsi128_si256(_mm_unpackhi_epi64(a, b));
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

}  // namespace

QLORA_AVX2 uint32_t max_abs_bits_avx2(const float* x, int64_t n) {
  const __m256i abs_mask = _mm256_set1_epi32(0x7FFFFFFF);
  __m256i m = _mm256_setzero_si256();
  for (int64_t i = 0; i < n; i += 8) {
    const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i));
    m = _mm256_max_epu32(m, _mm256_and_si256(bits, abs_mask));
  }
  return hmax_epu32(m);
}

QLORA_AVX2 void encode_pack_avx2(const float* x, int64_t n, float inv,
                                 const detail::FourBitTables& t, uint8_t* out) {
  __m256 bounds[15];
  for (int i = 0; i < 15; ++i) bounds[i] = _mm256_set1_ps(t.bounds[i]);
  alignas(32) int32_t order[16];
  for (int i = 0; i < 16; ++i) order[i] = t.order[i];
  const __m256i order_lo = _mm256_load_si256(reinterpret_cast<const __m256i*>(order));
  const __m256i order_hi = _mm256_load_si256(reinterpret_cast<const __m256i*>(order + 8));
  bool remap = false;
  for (int i = 0; i < 16; ++i) remap |= t.order[i] != i;

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

QLORA_AVX2 void expand_nibbles_32bit_avx2(const uint8_t* src, int64_t nbytes, const uint32_t* lut,
                                          uint32_t* dst) {
  __m256i tables[4];
  byte_tables_32(lut, tables);
  for (int64_t j = 0; j < nbytes; j += 16, dst += 32) {
    const __m256i idx = nibble_indices(src + j);
    const __m256i b0 = _mm256_shuffle_epi8(tables[0], idx),
                  b1 = _mm256_shuffle_epi8(tables[1], idx);
    const __m256i b2 = _mm256_shuffle_epi8(tables[2], idx),
                  b3 = _mm256_shuffle_epi8(tables[3], idx);
    const __m256i w01_lo = _mm256_unpacklo_epi8(b0, b1), w01_hi = _mm256_unpackhi_epi8(b0, b1);
    const __m256i w23_lo = _mm256_unpacklo_epi8(b2, b3), w23_hi = _mm256_unpackhi_epi8(b2, b3);
    const __m256i f0 = _mm256_unpacklo_epi16(w01_lo, w23_lo);  // elements 0..3 | 16..19
    const __m256i f1 = _mm256_unpackhi_epi16(w01_lo, w23_lo);  // 4..7 | 20..23
    const __m256i f2 = _mm256_unpacklo_epi16(w01_hi, w23_hi);  // 8..11 | 24..27
    const __m256i f3 = _mm256_unpackhi_epi16(w01_hi, w23_hi);  // 12..15 | 28..31
    auto* out = reinterpret_cast<__m256i*>(dst);
    _mm256_storeu_si256(out + 0, _mm256_permute2x128_si256(f0, f1, 0x20));
    _mm256_storeu_si256(out + 1, _mm256_permute2x128_si256(f2, f3, 0x20));
    _mm256_storeu_si256(out + 2, _mm256_permute2x128_si256(f0, f1, 0x31));
    _mm256_storeu_si256(out + 3, _mm256_permute2x128_si256(f2, f3, 0x31));
  }
}

QLORA_AVX2 void expand_nibbles_16bit_avx2(const uint8_t* src, int64_t nbytes, const uint16_t* lut,
                                          uint16_t* dst) {
  __m256i tables[2];
  byte_tables_16(lut, tables);
  for (int64_t j = 0; j < nbytes; j += 16, dst += 32) {
    const __m256i idx = nibble_indices(src + j);
    const __m256i b0 = _mm256_shuffle_epi8(tables[0], idx),
                  b1 = _mm256_shuffle_epi8(tables[1], idx);
    const __m256i lo = _mm256_unpacklo_epi8(b0, b1);  // elements 0..7 | 16..23
    const __m256i hi = _mm256_unpackhi_epi8(b0, b1);  // 8..15 | 24..31
    auto* out = reinterpret_cast<__m256i*>(dst);
    _mm256_storeu_si256(out + 0, _mm256_permute2x128_si256(lo, hi, 0x20));
    _mm256_storeu_si256(out + 1, _mm256_permute2x128_si256(lo, hi, 0x31));
  }
}

QLORA_AVX2 float dot_avx2(const float* a, const float* b, int64_t n) {
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

#else  // no AVX2 code on this target: the callers check avx2_enabled() first

uint32_t max_abs_bits_avx2(const float*, int64_t) { return 0; }
void encode_pack_avx2(const float*, int64_t, float, const detail::FourBitTables&, uint8_t*) {}
void expand_nibbles_32bit_avx2(const uint8_t*, int64_t, const uint32_t*, uint32_t*) {}
void expand_nibbles_16bit_avx2(const uint8_t*, int64_t, const uint16_t*, uint16_t*) {}
float dot_avx2(const float*, const float*, int64_t) { return 0.f; }

#endif

}  // namespace qlora::cpu::simd
