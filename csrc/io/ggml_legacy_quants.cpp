#include "io/ggml_legacy_quants.h"

#include <cfloat>
#include <cmath>
#include <cstring>

#include "io/ggml_kquants.h"

// Everything below mirrors ggml's reference encoders step by step: the same
// float expressions in the same order (a multiply never merged into an add),
// and the same float -> integer conversions, since one ulp or one truncation
// of difference moves an element to the next level.

namespace qlora::io::detail {

namespace {

constexpr int kQK = static_cast<int>(kLegacyQuantBlock);

void store_u16(uint8_t* p, uint16_t v) {
  p[0] = static_cast<uint8_t>(v & 0xFFu);
  p[1] = static_cast<uint8_t>(v >> 8);
}

void store_u32(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}

// ggml converts floats to int8_t / uint8_t with a plain C cast, which on
// x86-64 is a truncating conversion to int32 (cvttss2si / cvttps2dq) whose
// low byte is kept. A NaN or a value outside int32 (an infinite 1/d from a
// subnormal scale, say) gives the "integer indefinite" 0x80000000, so byte
// 0. C++ leaves such casts undefined; this spells out what ggml's build
// actually does, so degenerate blocks encode to the same bytes.
uint8_t truncated_low_byte(float v) {
  if (!(v >= -2147483648.0f && v < 2147483648.0f)) return 0;  // NaN, too large
  return static_cast<uint8_t>(static_cast<uint32_t>(static_cast<int32_t>(v)));
}

// ggml's MIN(hi, (int8_t)v): a signed comparison of the truncated byte, so
// a byte of 128..255 counts as negative and passes through unclamped.
uint8_t clamped_int8(float v, int hi) {
  const int b = static_cast<int8_t>(truncated_low_byte(v));
  return static_cast<uint8_t>(b < hi ? b : hi);
}

// The smallest and largest element of a block, compared as ggml does
// (a NaN never replaces either).
void block_min_max(const float* x, float* lo, float* hi) {
  float mn = FLT_MAX;
  float mx = -FLT_MAX;
  for (int j = 0; j < kQK; ++j) {
    if (x[j] < mn) mn = x[j];
    if (x[j] > mx) mx = x[j];
  }
  *lo = mn;
  *hi = mx;
}

// Asymmetric 4 bits: x ~ d * q + m with m the block minimum, q in [0, 15];
// element j in the low nibble of byte j, element j + 16 in its high nibble.
void encode_q4_1(const float* x, uint8_t* y) {
  float min;
  float max;
  block_min_max(x, &min, &max);
  const float d = (max - min) / 15.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  store_u16(y, kquant_fp32_to_fp16(d));
  store_u16(y + 2, kquant_fp32_to_fp16(min));
  uint8_t* qs = y + 4;
  for (int j = 0; j < kQK / 2; ++j) {
    const float x0 = (x[j] - min) * id;
    const float x1 = (x[kQK / 2 + j] - min) * id;
    const uint8_t q0 = clamped_int8(x0 + 0.5f, 15);
    const uint8_t q1 = clamped_int8(x1 + 0.5f, 15);
    // ggml ORs the whole first byte in, unmasked.
    qs[j] = static_cast<uint8_t>(q0 | (q1 << 4));
  }
}

// Bit 4 of the 5-bit level of element j goes to bit j of the 32-bit qh
// (elements 16..31 in the upper half), the low 4 bits to the nibbles as Q4.
void pack_5bit(const uint8_t* q, uint8_t* qh_out, uint8_t* qs) {
  uint32_t qh = 0;
  for (int j = 0; j < kQK / 2; ++j) {
    const uint8_t q0 = q[j];
    const uint8_t q1 = q[kQK / 2 + j];
    qs[j] = static_cast<uint8_t>((q0 & 0x0F) | ((q1 & 0x0F) << 4));
    qh |= static_cast<uint32_t>((q0 & 0x10u) >> 4) << j;
    qh |= static_cast<uint32_t>((q1 & 0x10u) >> 4) << (j + kQK / 2);
  }
  store_u32(qh_out, qh);
}

// Symmetric 5 bits: d = max / -16 with max the element of largest
// magnitude (the first on ties), so that element maps to level 0; levels
// are q - 16 with q in [0, 31].
void encode_q5_0(const float* x, uint8_t* y) {
  float amax = 0.0f;
  float max = 0.0f;
  for (int j = 0; j < kQK; ++j) {
    if (amax < std::fabs(x[j])) {
      amax = std::fabs(x[j]);
      max = x[j];
    }
  }
  const float d = max / -16.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  store_u16(y, kquant_fp32_to_fp16(d));
  uint8_t q[kQK];
  for (int j = 0; j < kQK; ++j) q[j] = clamped_int8(x[j] * id + 16.5f, 31);
  pack_5bit(q, y + 2, y + 6);
}

// Asymmetric 5 bits, as Q4_1 with 31 steps; ggml does not clamp the level
// here, it only truncates it to a byte.
void encode_q5_1(const float* x, uint8_t* y) {
  float min;
  float max;
  block_min_max(x, &min, &max);
  const float d = (max - min) / 31.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  store_u16(y, kquant_fp32_to_fp16(d));
  store_u16(y + 2, kquant_fp32_to_fp16(min));
  uint8_t q[kQK];
  for (int j = 0; j < kQK; ++j) q[j] = truncated_low_byte((x[j] - min) * id + 0.5f);
  pack_5bit(q, y + 4, y + 8);
}

// Symmetric 8 bits: d = amax / 127, q = round-half-away(x / d).
void encode_q8_0(const float* x, uint8_t* y) {
  float amax = 0.0f;
  for (int j = 0; j < kQK; ++j) {
    const float a = std::fabs(x[j]);
    amax = amax > a ? amax : a;  // ggml's MAX macro, NaN behaviour included
  }
  const float d = amax / 127.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  store_u16(y, kquant_fp32_to_fp16(d));
  for (int j = 0; j < kQK; ++j) y[2 + j] = truncated_low_byte(std::round(x[j] * id));
}

template <void (*Encode)(const float*, uint8_t*)>
void encode_blocks(const float* src, int64_t n_blocks, uint8_t* dst, int64_t block_bytes) {
  for (int64_t b = 0; b < n_blocks; ++b) Encode(src + b * kQK, dst + b * block_bytes);
}

}  // namespace

void quantize_q4_1(const float* src, int64_t n_blocks, uint8_t* dst) {
  encode_blocks<encode_q4_1>(src, n_blocks, dst, kQ4_1Bytes);
}

void quantize_q5_0(const float* src, int64_t n_blocks, uint8_t* dst) {
  encode_blocks<encode_q5_0>(src, n_blocks, dst, kQ5_0Bytes);
}

void quantize_q5_1(const float* src, int64_t n_blocks, uint8_t* dst) {
  encode_blocks<encode_q5_1>(src, n_blocks, dst, kQ5_1Bytes);
}

void quantize_q8_0(const float* src, int64_t n_blocks, uint8_t* dst) {
  encode_blocks<encode_q8_0>(src, n_blocks, dst, kQ8_0Bytes);
}

}  // namespace qlora::io::detail
