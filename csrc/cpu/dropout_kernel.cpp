#include "dropout_kernel.h"

#include <ATen/Parallel.h>

#include <algorithm>

#include "cpu_utils.h"
#include "fourbit_avx2.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

namespace qlora::cpu {
namespace {

// The index's high word is constant within a run that does not cross a
// 2^32 boundary, so it is hoisted into `hi`.
void dropout_run(const float* in, float* out, int64_t n, uint64_t first,
                 const detail::DropoutKey& key) {
  const uint32_t lo0 = static_cast<uint32_t>(first);
  const uint32_t hi = static_cast<uint32_t>(first >> 32) ^ key.k1;
  const uint32_t k0 = key.k0, threshold = key.threshold;
  const float scale = key.scale;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t h = detail::mix32(detail::mix32((lo0 + static_cast<uint32_t>(i)) ^ k0) + hi);
    out[i] = h >= threshold ? in[i] * scale : 0.0f;
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
#define QLORA_AVX2 __attribute__((target("avx2")))

QLORA_AVX2 inline __m256i mix32_avx2(__m256i x) {
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x7feb352d));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(static_cast<int>(0x846ca68bU)));
  return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
}

// Eight elements a step, the same hash as detail::dropout_keeps; the tail
// goes through the scalar loop.
QLORA_AVX2 void dropout_run_avx2(const float* in, float* out, int64_t n, uint64_t first,
                                 const detail::DropoutKey& key) {
  const uint32_t lo0 = static_cast<uint32_t>(first);
  const __m256i hi =
      _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(first >> 32) ^ key.k1));
  const __m256i k0 = _mm256_set1_epi32(static_cast<int>(key.k0));
  const __m256i threshold = _mm256_set1_epi32(static_cast<int>(key.threshold));
  const __m256 scale = _mm256_set1_ps(key.scale);
  __m256i idx = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(lo0)),
                                 _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  const __m256i eight = _mm256_set1_epi32(8);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i h = mix32_avx2(_mm256_add_epi32(mix32_avx2(_mm256_xor_si256(idx, k0)), hi));
    // Unsigned h >= threshold  <=>  max(h, threshold) == h.
    const __m256i keep = _mm256_cmpeq_epi32(_mm256_max_epu32(h, threshold), h);
    const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(in + i), scale);
    _mm256_storeu_ps(out + i, _mm256_and_ps(v, _mm256_castsi256_ps(keep)));
    idx = _mm256_add_epi32(idx, eight);
  }
  if (i < n) dropout_run(in + i, out + i, n - i, first + static_cast<uint64_t>(i), key);
}
#endif

void dropout_span(const float* in, float* out, int64_t n, uint64_t first,
                  const detail::DropoutKey& key) {
  // Split where the index's low word wraps, so each run has one high word.
  while (n > 0) {
    const uint64_t to_wrap = (uint64_t{1} << 32) - static_cast<uint32_t>(first);
    const int64_t run = static_cast<int64_t>(std::min<uint64_t>(static_cast<uint64_t>(n), to_wrap));
#if defined(__x86_64__) && defined(__GNUC__)
    if (simd::avx2_enabled())
      dropout_run_avx2(in, out, run, first, key);
    else
#endif
      dropout_run(in, out, run, first, key);
    in += run, out += run, n -= run, first += static_cast<uint64_t>(run);
  }
}

}  // namespace

void dropout_apply(const float* in, float* out, int64_t n, int64_t i0,
                   const detail::DropoutKey& key) {
  at::parallel_for(0, n, kGrainElements, [&](int64_t begin, int64_t end) {
    dropout_span(in + begin, out + begin, end - begin, static_cast<uint64_t>(i0 + begin), key);
  });
}

}  // namespace qlora::cpu
