#include "io/ggml_dequant.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>

// Blocks are read byte by byte / with memcpy in file (little-endian) order.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "GGUF dequantisation assumes a little-endian host");

namespace qlora::io {
namespace {

// Each block decoder below follows the structure of the matching
// dequantize_row_* in ggml-quants.c operation for operation (same operand
// types, same order of multiplications and additions), which is what makes
// the results bit-identical. Block layouts are those of ggml-common.h.
constexpr int kQK = 32;  // elements per block of the _0 / _1 types

float f16_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, sizeof(h));
  // Exact IEEE half -> float widening, as GGML_FP16_TO_FP32.
  return c10::detail::fp16_ieee_to_fp32_value(h);
}

float f32_at(const uint8_t* p) {
  float f;
  std::memcpy(&f, p, sizeof(f));
  return f;
}

float bf16_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, sizeof(h));
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

uint32_t u32_at(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// block_q8_0 {f16 d; int8 qs[32]}: y = q * d.
void block_q8_0(const uint8_t* b, float* y) {
  const float d = f16_at(b);
  const auto* qs = reinterpret_cast<const int8_t*>(b + 2);
  for (int j = 0; j < kQK; ++j) y[j] = qs[j] * d;
}

// block_q4_0 {f16 d; uint8 qs[16]}: low nibble -> element j, high nibble ->
// element j + 16, both offset by 8.
void block_q4_0(const uint8_t* b, float* y) {
  const float d = f16_at(b);
  const uint8_t* qs = b + 2;
  for (int j = 0; j < kQK / 2; ++j) {
    const int x0 = (qs[j] & 0x0F) - 8;
    const int x1 = (qs[j] >> 4) - 8;
    y[j] = x0 * d;
    y[j + kQK / 2] = x1 * d;
  }
}

// block_q4_1 {f16 d; f16 m; uint8 qs[16]}: y = q * d + m.
void block_q4_1(const uint8_t* b, float* y) {
  const float d = f16_at(b);
  const float m = f16_at(b + 2);
  const uint8_t* qs = b + 4;
  for (int j = 0; j < kQK / 2; ++j) {
    const int x0 = qs[j] & 0x0F;
    const int x1 = qs[j] >> 4;
    y[j] = x0 * d + m;
    y[j + kQK / 2] = x1 * d + m;
  }
}

// The fifth bit of element j (j < 16) is bit j of qh, of element j + 16 bit
// j + 16; both returned in bit position 4.
int q5_high_low(uint32_t qh, int j) { return static_cast<uint8_t>(((qh >> j) << 4) & 0x10); }
int q5_high_high(uint32_t qh, int j) { return static_cast<uint8_t>((qh >> (j + 12)) & 0x10); }

// block_q5_0 {f16 d; uint8 qh[4]; uint8 qs[16]}: 5-bit values offset by 16.
void block_q5_0(const uint8_t* b, float* y) {
  const float d = f16_at(b);
  const uint32_t qh = u32_at(b + 2);
  const uint8_t* qs = b + 6;
  for (int j = 0; j < kQK / 2; ++j) {
    const int32_t x0 = ((qs[j] & 0x0F) | q5_high_low(qh, j)) - 16;
    const int32_t x1 = ((qs[j] >> 4) | q5_high_high(qh, j)) - 16;
    y[j] = x0 * d;
    y[j + kQK / 2] = x1 * d;
  }
}

// block_q5_1 {f16 d; f16 m; uint8 qh[4]; uint8 qs[16]}: y = q * d + m.
void block_q5_1(const uint8_t* b, float* y) {
  const float d = f16_at(b);
  const float m = f16_at(b + 2);
  const uint32_t qh = u32_at(b + 4);
  const uint8_t* qs = b + 8;
  for (int j = 0; j < kQK / 2; ++j) {
    const int x0 = (qs[j] & 0x0F) | q5_high_low(qh, j);
    const int x1 = (qs[j] >> 4) | q5_high_high(qh, j);
    y[j] = x0 * d + m;
    y[j + kQK / 2] = x1 * d + m;
  }
}

// The 6-bit scale and min of sub-block j (0..7) from Q4_K's 12 packed bytes:
// sub-blocks 0-3 sit in the low 6 bits of bytes 0-3 (scales) and 4-7
// (mins); 4-7 take their low 4 bits from the nibbles of bytes 8-11 and their
// top 2 bits from the spare top bits of bytes 0-7.
void q4_k_scale_min(int j, const uint8_t* q, uint8_t* scale, uint8_t* min) {
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
void block_q4_k(const uint8_t* b, float* y) {
  const float d = f16_at(b);
  const float dmin = f16_at(b + 2);
  const uint8_t* scales = b + 4;
  const uint8_t* q = b + 16;
  for (int sub = 0; sub < 8; sub += 2, q += 32) {
    uint8_t sc;
    uint8_t m;
    q4_k_scale_min(sub, scales, &sc, &m);
    const float d1 = d * sc;
    const float m1 = dmin * m;
    q4_k_scale_min(sub + 1, scales, &sc, &m);
    const float d2 = d * sc;
    const float m2 = dmin * m;
    for (int l = 0; l < 32; ++l) *y++ = d1 * (q[l] & 0xF) - m1;
    for (int l = 0; l < 32; ++l) *y++ = d2 * (q[l] >> 4) - m2;
  }
}

// block_q6_K {uint8 ql[128]; uint8 qh[64]; int8 scales[16]; f16 d}: 6-bit
// values offset by 32, low 4 bits in ql, high 2 bits in qh; one int8 scale
// per 16 elements. Each half of the block (128 elements) uses 64 bytes of
// ql, 32 of qh and 8 scales. y = (d * scale) * q.
void block_q6_k(const uint8_t* b, float* y) {
  const float d = f16_at(b + 208);
  const uint8_t* ql = b;
  const uint8_t* qh = b + 128;
  const auto* sc = reinterpret_cast<const int8_t*>(b + 192);
  for (int half = 0; half < 2; ++half, y += 128, ql += 64, qh += 32, sc += 8) {
    for (int l = 0; l < 32; ++l) {
      const int is = l / 16;
      const int q1 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
      const int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
      const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
      const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
      y[l] = d * sc[is + 0] * q1;
      y[l + 32] = d * sc[is + 2] * q2;
      y[l + 64] = d * sc[is + 4] * q3;
      y[l + 96] = d * sc[is + 6] * q4;
    }
  }
}

void block_f32(const uint8_t* b, float* y) { *y = f32_at(b); }
void block_f16(const uint8_t* b, float* y) { *y = f16_at(b); }
void block_bf16(const uint8_t* b, float* y) { *y = bf16_at(b); }

using BlockFn = void (*)(const uint8_t*, float*);

BlockFn block_fn(GgmlType type) {
  switch (type) {
    case GgmlType::F32:
      return block_f32;
    case GgmlType::F16:
      return block_f16;
    case GgmlType::BF16:
      return block_bf16;
    case GgmlType::Q8_0:
      return block_q8_0;
    case GgmlType::Q4_0:
      return block_q4_0;
    case GgmlType::Q4_1:
      return block_q4_1;
    case GgmlType::Q5_0:
      return block_q5_0;
    case GgmlType::Q5_1:
      return block_q5_1;
    case GgmlType::Q4_K:
      return block_q4_k;
    case GgmlType::Q6_K:
      return block_q6_k;
    default:
      return nullptr;
  }
}

}  // namespace

bool ggml_can_dequantize(GgmlType type) { return block_fn(type) != nullptr; }

namespace detail {

void dequantize_ggml(GgmlType type, const uint8_t* src, int64_t numel, float* dst) {
  const BlockFn fn = block_fn(type);
  const GgmlTypeTraits& traits = ggml_type_traits(type);
  TORCH_INTERNAL_ASSERT(fn != nullptr, "no dequantiser for ggml type ", traits.name);
  TORCH_INTERNAL_ASSERT(numel % traits.block_size == 0);
  // A tensor's bytes are just its blocks back to back (a row is a whole
  // number of blocks), so splitting by blocks rather than by rows keeps
  // 1-D tensors and single long rows parallel too. ~16K elements per task
  // amortises the scheduling.
  const int64_t n_blocks = numel / traits.block_size;
  const int64_t grain = std::max<int64_t>(1, 16384 / traits.block_size);
  at::parallel_for(0, n_blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      fn(src + i * traits.type_size, dst + i * traits.block_size);
    }
  });
}

}  // namespace detail
}  // namespace qlora::io
