// Per-element math of the 4-bit and 8-bit blockwise formats, shared by the
// CPU and CUDA kernels so the CPU tests exercise exactly what the GPU runs.
// Every rule here reproduces bitsandbytes' reference (CPU) quantizer
// bit for bit: see tests/python/test_bnb_conformance.py.
#pragma once

#include <cstdint>
#include <cstring>

#include "common/codebooks.h"

#include "common/host_device.h"

namespace qlora::detail {

// bitsandbytes clamps absmax before normalising, so an all-zero block
// normalises to 0 and encodes as the code of 0.0 instead of NaN garbage.
constexpr float kMinAbsmax = 1e-38f;
// Bit pattern of +inf: |x| bits at or above it mean inf or NaN.
constexpr uint32_t kNonFiniteBits = 0x7F800000u;

enum class QuantType : int8_t { kNF4 = 0, kFP4 = 1 };

// Everything a 4-bit encoder/decoder needs, passed by reference so the CPU
// uses a static copy and CUDA a __constant__ one.
struct FourBitTables {
  float values[16];   // code -> value
  float bounds[15];   // decision boundaries between value-sorted codes
  uint8_t order[16];  // value rank -> code (identity for NF4)
};

QLORA_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

QLORA_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
#endif
}

// |x| as an integer: for non-NaN floats, ordering of these bits is the
// ordering of |x|, so a block's absmax is an integer max reduction (which
// vectorises without -ffast-math) and inf/NaN show up as >= kNonFiniteBits.
QLORA_HD uint32_t abs_bits(float x) { return float_bits(x) & 0x7FFFFFFFu; }

QLORA_HD float clamp_unit(float v) { return v < -1.f ? -1.f : (v > 1.f ? 1.f : v); }

// Full blocks are scaled by the float32 reciprocal (bitsandbytes multiplies
// by 1/absmax); the trailing partial block is divided, as bitsandbytes does.
QLORA_HD float reciprocal_scale(float absmax) {
  return 1.0f / (absmax < kMinAbsmax ? kMinAbsmax : absmax);
}
QLORA_HD float normalise_full(float x, float inv_absmax) { return clamp_unit(x * inv_absmax); }
QLORA_HD float normalise_partial(float x, float absmax) {
  return clamp_unit(x / (absmax < kMinAbsmax ? kMinAbsmax : absmax));
}

// torch.bucketize(v, bounds, right=False): the number of bounds strictly
// below v, so a value on a boundary goes to the lower code.
QLORA_HD int bucket_of_15(float v, const float* bounds) {
  int rank = 0;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int i = 0; i < 15; ++i) rank += v > bounds[i] ? 1 : 0;
  return rank;
}

QLORA_HD uint8_t encode_4bit(float normalised, const FourBitTables& t) {
  return t.order[bucket_of_15(normalised, t.bounds)];
}

// Same rule over a sorted 256-entry code: branchless binary search over its
// 255 boundaries (rank = number of boundaries strictly below v).
QLORA_HD uint8_t encode_8bit(float v, const float* bounds255) {
  int pos = 0;
  for (int step = 128; step > 0; step >>= 1) pos += v > bounds255[pos + step - 1] ? step : 0;
  return static_cast<uint8_t>(pos);
}

// The even element of a pair goes in the high nibble.
QLORA_HD uint8_t pack_pair(uint8_t even, uint8_t odd) {
  return static_cast<uint8_t>((even << 4) | odd);
}
QLORA_HD uint8_t nibble_at(const uint8_t* packed, int64_t i) {
  const uint8_t b = packed[i >> 1];
  return (i & 1) ? (b & 0x0F) : (b >> 4);
}

QLORA_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace qlora::detail
