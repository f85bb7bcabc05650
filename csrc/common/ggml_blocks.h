// Block layouts and per-block decoders of the ggml tensor types a GGUF base
// can keep (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K),
// shared by the GGUF reader (io/), the CPU kernels at every capability level
// and CUDA, so one set of rules is tested everywhere.
//
// Each decoder follows the matching dequantize_row_* of ggml-quants.c
// operation for operation (same operand types, same order of
// multiplications and additions), which is what makes the float32 results
// bit-identical to ggml and to gguf-py. That needs a*b+c rounded twice:
// every file that includes this one is compiled with -ffp-contract=off
// (nvcc: --fmad=false).
#pragma once

#include <cstdint>
#include <cstring>

#include "common/host_device.h"

// Host decoders are forced inline so a SIMD level's loop (compiled with its
// own target attribute) gets them inlined and vectorised for that level.
#if defined(__CUDACC__)
#define QLORA_GGML_HD QLORA_HD
#else
#define QLORA_GGML_HD inline __attribute__((always_inline))
#endif

namespace qlora::detail {

// ggml's type numbers, as stored in GGUF tensor infos.
enum class GgmlCode : int32_t {
  kF32 = 0,
  kF16 = 1,
  kQ4_0 = 2,
  kQ4_1 = 3,
  kQ5_0 = 6,
  kQ5_1 = 7,
  kQ8_0 = 8,
  kQ4_K = 12,
  kQ5_K = 13,
  kQ6_K = 14,
  kBF16 = 30,
};

struct GgmlBlockLayout {
  GgmlCode code;
  const char* name;    // ggml's name: "Q4_K"
  int32_t block_size;  // elements per block
  int32_t type_size;   // bytes per block
};

inline constexpr GgmlBlockLayout kGgmlBlockLayouts[] = {
    {GgmlCode::kF32, "F32", 1, 4},       {GgmlCode::kF16, "F16", 1, 2},
    {GgmlCode::kBF16, "BF16", 1, 2},     {GgmlCode::kQ4_0, "Q4_0", 32, 18},
    {GgmlCode::kQ4_1, "Q4_1", 32, 20},   {GgmlCode::kQ5_0, "Q5_0", 32, 22},
    {GgmlCode::kQ5_1, "Q5_1", 32, 24},   {GgmlCode::kQ8_0, "Q8_0", 32, 34},
    {GgmlCode::kQ4_K, "Q4_K", 256, 144}, {GgmlCode::kQ5_K, "Q5_K", 256, 176},
    {GgmlCode::kQ6_K, "Q6_K", 256, 210},
};

// The layout of a type these decoders handle (host code); nullptr for any
// other number.
inline const GgmlBlockLayout* ggml_block_layout(int32_t code) {
  for (const GgmlBlockLayout& l : kGgmlBlockLayouts)
    if (static_cast<int32_t>(l.code) == code) return &l;
  return nullptr;
}

// Exact IEEE half -> float (GGML_FP16_TO_FP32), by bits: no FPU mode or
// F16C instruction involved. NaNs come out quiet with their payload, as
// torch's conversion (and F16C) gives them.
QLORA_GGML_HD float ggml_f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu;
  uint32_t bits;
  if (exp == 0) {
    // Zero or subnormal: mant * 2^-24, exact in float32.
    const float v = static_cast<float>(mant) * 5.9604644775390625e-8f;
    uint32_t vb;
    std::memcpy(&vb, &v, sizeof(vb));
    bits = sign | vb;
  } else if (exp == 31) {
    bits = sign | 0x7F800000u | (mant << 13) | (mant != 0 ? 0x00400000u : 0u);
  } else {
    bits = sign | ((exp + 112u) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

QLORA_GGML_HD uint16_t ggml_u16_at(const uint8_t* p) {
  return static_cast<uint16_t>(p[0] | (p[1] << 8));
}
QLORA_GGML_HD uint32_t ggml_u32_at(const uint8_t* p) {
  return static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[1]) << 8) |
         (static_cast<uint32_t>(p[2]) << 16) | (static_cast<uint32_t>(p[3]) << 24);
}
QLORA_GGML_HD float ggml_f16_at(const uint8_t* p) { return ggml_f16_to_f32(ggml_u16_at(p)); }

// block_q8_0 {f16 d; int8 qs[32]}: y = q * d.
QLORA_GGML_HD void ggml_block_q8_0(const uint8_t* b, float* y) {
  const float d = ggml_f16_at(b);
  for (int j = 0; j < 32; ++j) y[j] = static_cast<int8_t>(b[2 + j]) * d;
}

// block_q4_0 {f16 d; uint8 qs[16]}: low nibble -> element j, high nibble ->
// element j + 16, both offset by 8.
QLORA_GGML_HD void ggml_block_q4_0(const uint8_t* b, float* y) {
  const float d = ggml_f16_at(b);
  const uint8_t* qs = b + 2;
  for (int j = 0; j < 16; ++j) {
    y[j] = ((qs[j] & 0x0F) - 8) * d;
    y[j + 16] = ((qs[j] >> 4) - 8) * d;
  }
}

// block_q4_1 {f16 d; f16 m; uint8 qs[16]}: y = q * d + m.
QLORA_GGML_HD void ggml_block_q4_1(const uint8_t* b, float* y) {
  const float d = ggml_f16_at(b);
  const float m = ggml_f16_at(b + 2);
  const uint8_t* qs = b + 4;
  for (int j = 0; j < 16; ++j) {
    y[j] = (qs[j] & 0x0F) * d + m;
    y[j + 16] = (qs[j] >> 4) * d + m;
  }
}

// The fifth bit of element j (j < 16) is bit j of qh, that of element
// j + 16 bit j + 16; both returned in bit position 4.
QLORA_GGML_HD int ggml_q5_high_lo(uint32_t qh, int j) { return ((qh >> j) << 4) & 0x10; }
QLORA_GGML_HD int ggml_q5_high_hi(uint32_t qh, int j) { return (qh >> (j + 12)) & 0x10; }

// block_q5_0 {f16 d; uint8 qh[4]; uint8 qs[16]}: 5-bit values offset by 16.
QLORA_GGML_HD void ggml_block_q5_0(const uint8_t* b, float* y) {
  const float d = ggml_f16_at(b);
  const uint32_t qh = ggml_u32_at(b + 2);
  const uint8_t* qs = b + 6;
  for (int j = 0; j < 16; ++j) {
    y[j] = (((qs[j] & 0x0F) | ggml_q5_high_lo(qh, j)) - 16) * d;
    y[j + 16] = (((qs[j] >> 4) | ggml_q5_high_hi(qh, j)) - 16) * d;
  }
}

// block_q5_1 {f16 d; f16 m; uint8 qh[4]; uint8 qs[16]}: y = q * d + m.
QLORA_GGML_HD void ggml_block_q5_1(const uint8_t* b, float* y) {
  const float d = ggml_f16_at(b);
  const float m = ggml_f16_at(b + 2);
  const uint32_t qh = ggml_u32_at(b + 4);
  const uint8_t* qs = b + 8;
  for (int j = 0; j < 16; ++j) {
    y[j] = ((qs[j] & 0x0F) | ggml_q5_high_lo(qh, j)) * d + m;
    y[j + 16] = ((qs[j] >> 4) | ggml_q5_high_hi(qh, j)) * d + m;
  }
}

// The 6-bit scale and min of sub-block j (0..7) from the 12 packed bytes of
// Q4_K and Q5_K: sub-blocks 0-3 sit in the low 6 bits of bytes 0-3
// (scales) and 4-7 (mins); 4-7 take their low 4 bits from the nibbles of
// bytes 8-11 and their top 2 bits from the spare top bits of bytes 0-7.
QLORA_GGML_HD void ggml_k4_scale_min(int j, const uint8_t* q, uint8_t* scale, uint8_t* min) {
  if (j < 4) {
    *scale = q[j] & 63;
    *min = q[j + 4] & 63;
  } else {
    *scale = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    *min = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

// block_q4_K {f16 d; f16 dmin; uint8 scales[12]; uint8 qs[128]}: eight
// sub-blocks of 32; each 32 bytes of qs hold two sub-blocks (low nibbles
// first). y = (d * scale) * q - dmin * min.
QLORA_GGML_HD void ggml_block_q4_k(const uint8_t* b, float* y) {
  const float d = ggml_f16_at(b);
  const float dmin = ggml_f16_at(b + 2);
  const uint8_t* scales = b + 4;
  const uint8_t* q = b + 16;
  for (int sub = 0; sub < 8; sub += 2, q += 32, y += 64) {
    uint8_t sc, m;
    ggml_k4_scale_min(sub, scales, &sc, &m);
    const float d1 = d * sc, m1 = dmin * m;
    ggml_k4_scale_min(sub + 1, scales, &sc, &m);
    const float d2 = d * sc, m2 = dmin * m;
    for (int l = 0; l < 32; ++l) y[l] = d1 * (q[l] & 0xF) - m1;
    for (int l = 0; l < 32; ++l) y[32 + l] = d2 * (q[l] >> 4) - m2;
  }
}

// block_q5_K {f16 d; f16 dmin; uint8 scales[12]; uint8 qh[32]; uint8
// qs[128]}: Q4_K's layout plus a fifth bit per element, sub-block s taking
// bit s of qh[l]. y = (d * scale) * q - dmin * min.
QLORA_GGML_HD void ggml_block_q5_k(const uint8_t* b, float* y) {
  const float d = ggml_f16_at(b);
  const float dmin = ggml_f16_at(b + 2);
  const uint8_t* scales = b + 4;
  const uint8_t* qh = b + 16;
  const uint8_t* ql = b + 48;
  for (int sub = 0; sub < 8; sub += 2, ql += 32, y += 64) {
    uint8_t sc, m;
    ggml_k4_scale_min(sub, scales, &sc, &m);
    const float d1 = d * sc, m1 = dmin * m;
    ggml_k4_scale_min(sub + 1, scales, &sc, &m);
    const float d2 = d * sc, m2 = dmin * m;
    const uint8_t u1 = static_cast<uint8_t>(1u << sub), u2 = static_cast<uint8_t>(2u << sub);
    for (int l = 0; l < 32; ++l) y[l] = d1 * ((ql[l] & 0xF) + (qh[l] & u1 ? 16 : 0)) - m1;
    for (int l = 0; l < 32; ++l) y[32 + l] = d2 * ((ql[l] >> 4) + (qh[l] & u2 ? 16 : 0)) - m2;
  }
}

// block_q6_K {uint8 ql[128]; uint8 qh[64]; int8 scales[16]; f16 d}: 6-bit
// values offset by 32, low 4 bits in ql, high 2 bits in qh; one int8 scale
// per 16 elements. Each half of the block (128 elements) uses 64 bytes of
// ql, 32 of qh and 8 scales. y = (d * scale) * q.
QLORA_GGML_HD void ggml_block_q6_k(const uint8_t* b, float* y) {
  const float d = ggml_f16_at(b + 208);
  const uint8_t* ql = b;
  const uint8_t* qh = b + 128;
  const uint8_t* sc = b + 192;
  for (int half = 0; half < 2; ++half, y += 128, ql += 64, qh += 32, sc += 8) {
    for (int l = 0; l < 32; ++l) {
      const int is = l / 16;
      const int q1 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
      const int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
      const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
      const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
      y[l] = d * static_cast<int8_t>(sc[is + 0]) * q1;
      y[l + 32] = d * static_cast<int8_t>(sc[is + 2]) * q2;
      y[l + 64] = d * static_cast<int8_t>(sc[is + 4]) * q3;
      y[l + 96] = d * static_cast<int8_t>(sc[is + 6]) * q4;
    }
  }
}

QLORA_GGML_HD void ggml_block_f32(const uint8_t* b, float* y) {
  const uint32_t bits = ggml_u32_at(b);
  std::memcpy(y, &bits, sizeof(float));
}
QLORA_GGML_HD void ggml_block_f16(const uint8_t* b, float* y) { *y = ggml_f16_at(b); }
QLORA_GGML_HD void ggml_block_bf16(const uint8_t* b, float* y) {
  const uint32_t bits = static_cast<uint32_t>(ggml_u16_at(b)) << 16;
  std::memcpy(y, &bits, sizeof(float));
}

// Decodes `blocks` consecutive blocks of `code` (one of ggml_block_layout's
// types) from `src` into `dst`; the type switch is outside the loop.
QLORA_GGML_HD void ggml_decode_blocks(GgmlCode code, const uint8_t* src, int64_t blocks,
                                      float* dst) {
#define QLORA_GGML_LOOP(fn, bs, ts) \
  for (int64_t i = 0; i < blocks; ++i) fn(src + i * (ts), dst + i * (bs));
  switch (code) {
    case GgmlCode::kF32:
      QLORA_GGML_LOOP(ggml_block_f32, 1, 4) break;
    case GgmlCode::kF16:
      QLORA_GGML_LOOP(ggml_block_f16, 1, 2) break;
    case GgmlCode::kBF16:
      QLORA_GGML_LOOP(ggml_block_bf16, 1, 2) break;
    case GgmlCode::kQ4_0:
      QLORA_GGML_LOOP(ggml_block_q4_0, 32, 18) break;
    case GgmlCode::kQ4_1:
      QLORA_GGML_LOOP(ggml_block_q4_1, 32, 20) break;
    case GgmlCode::kQ5_0:
      QLORA_GGML_LOOP(ggml_block_q5_0, 32, 22) break;
    case GgmlCode::kQ5_1:
      QLORA_GGML_LOOP(ggml_block_q5_1, 32, 24) break;
    case GgmlCode::kQ8_0:
      QLORA_GGML_LOOP(ggml_block_q8_0, 32, 34) break;
    case GgmlCode::kQ4_K:
      QLORA_GGML_LOOP(ggml_block_q4_k, 256, 144) break;
    case GgmlCode::kQ5_K:
      QLORA_GGML_LOOP(ggml_block_q5_k, 256, 176) break;
    case GgmlCode::kQ6_K:
      QLORA_GGML_LOOP(ggml_block_q6_k, 256, 210) break;
  }
#undef QLORA_GGML_LOOP
}

}  // namespace qlora::detail
