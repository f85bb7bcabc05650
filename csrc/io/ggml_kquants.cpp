#include "io/ggml_kquants.h"

#include <algorithm>
#include <cmath>
#include <cstring>

// Everything below mirrors ggml's reference K-quant encoders step by step.
// Each float expression keeps ggml's operand types (an int operand is
// converted to float right where ggml's C expression converts it) and its
// left-to-right grouping, since regrouping or merging a multiply into an add
// would change a rounding and, through a different grid choice, the bytes.

namespace qlora::io::detail {

namespace {

// A group whose largest magnitude is below this is treated as all zeros
// (ggml's GROUP_MAX_EPS).
constexpr float kGroupMaxEps = 1e-15f;

uint32_t bits_of(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof(b));
  return b;
}

void store_u16(uint8_t* p, uint16_t v) {
  p[0] = static_cast<uint8_t>(v & 0xFFu);
  p[1] = static_cast<uint8_t>(v >> 8);
}

// The requantisation step reads d and dmin back from their stored halves, so
// the rounding of the header feeds into every element: this must be exact.
float half_to_float(uint16_t h) {
  const uint32_t exp = (h >> 10) & 0x1Fu;
  const uint32_t mant = h & 0x3FFu;
  float v;
  if (exp == 0) {
    v = static_cast<float>(mant) * 0x1p-24f;  // exact: mant < 2^10
  } else if (exp == 31) {
    v = mant == 0 ? INFINITY : NAN;
  } else {
    const uint32_t bits = ((exp + 112u) << 23) | (mant << 13);
    std::memcpy(&v, &bits, sizeof(v));
  }
  return (h & 0x8000u) ? -v : v;
}

// Round half to even through the FPU: for |v| < 2^22, v + 1.5 * 2^23 lies
// in [2^23, 2^24), where floats are exactly the integers, so the addition
// itself does the rounding and leaves the integer in the low mantissa bits.
// Inputs outside that range (huge, infinite, NaN) give a meaningless value,
// but the same one ggml gets; every caller clamps it.
int nearest_int(float v) {
  const uint32_t bits = bits_of(v + 12582912.0f);
  return static_cast<int>(bits & 0x007FFFFFu) - 0x00400000;
}

int clamp_int(int v, int lo, int hi) { return std::max(lo, std::min(hi, v)); }

// ---- Q4_K / Q5_K: 8 sub-blocks of 32, x ~ scale * q - min ----------------

constexpr int kSub = 32;

// Weighted least-squares fit of x by scale * L + m (L in [0, nmax], m <= 0)
// for one 32-element sub-block, as make_qkx2_quants (squared error): start
// on the grid spanning [min(x, 0), max(x)], then try grids stretched by
// rmin + rdelta * k steps, refitting scale and offset in closed form on
// each and keeping whichever lowers the weighted error. Returns the scale;
// *neg_min receives -m (>= 0).
//
// `lo` is the offset of the best fit so far and the trial grids are laid
// between it and max(x): it moves when a trial wins, exactly as in ggml,
// so it must not be hoisted out of the loop.
float fit_scale_and_min(const float* x, const float* w, int nmax, float rmin, float rdelta,
                        int nstep, uint8_t* L, float* neg_min) {
  float lo = x[0];
  float hi = x[0];
  float sum_w = w[0];
  float sum_x = sum_w * x[0];
  for (int i = 1; i < kSub; ++i) {
    if (x[i] < lo) lo = x[i];
    if (x[i] > hi) hi = x[i];
    sum_w += w[i];
    sum_x += w[i] * x[i];
  }
  if (lo > 0) lo = 0;
  if (hi == lo) {
    std::memset(L, 0, kSub);
    *neg_min = -lo;
    return 0.0f;
  }

  float inv = static_cast<float>(nmax) / (hi - lo);
  float scale = 1.0f / inv;
  float best_err = 0;
  for (int i = 0; i < kSub; ++i) {
    L[i] = static_cast<uint8_t>(clamp_int(nearest_int(inv * (x[i] - lo)), 0, nmax));
    const float diff = scale * static_cast<float>(L[i]) + lo - x[i];
    best_err += w[i] * (diff * diff);
  }

  uint8_t trial[kSub];
  for (int step = 0; step <= nstep; ++step) {
    inv = (rmin + rdelta * static_cast<float>(step) + static_cast<float>(nmax)) / (hi - lo);
    float sum_l = 0, sum_l2 = 0, sum_xl = 0;
    for (int i = 0; i < kSub; ++i) {
      const int l = clamp_int(nearest_int(inv * (x[i] - lo)), 0, nmax);
      trial[i] = static_cast<uint8_t>(l);
      const float fl = static_cast<float>(l);
      const float wl = w[i] * fl;  // ggml forms w*l once per term, then scales it
      sum_l += wl;
      sum_l2 += wl * fl;
      sum_xl += wl * x[i];
    }
    const float det = sum_w * sum_l2 - sum_l * sum_l;
    if (!(det > 0)) continue;
    float s = (sum_w * sum_xl - sum_x * sum_l) / det;
    float m = (sum_l2 * sum_x - sum_l * sum_xl) / det;
    if (m > 0) {
      // The offset may only subtract: refit the scale through the origin.
      m = 0;
      s = sum_xl / sum_l2;
    }
    float err = 0;
    for (int i = 0; i < kSub; ++i) {
      const float diff = s * static_cast<float>(trial[i]) + m - x[i];
      err += w[i] * (diff * diff);
    }
    if (err < best_err) {
      std::memcpy(L, trial, kSub);
      best_err = err;
      scale = s;
      lo = m;
    }
  }
  *neg_min = -lo;
  return scale;
}

// The 12-byte scale/min table shared by Q4_K and Q5_K (the inverse of
// ggml_k4_scale_min in common/ggml_blocks.h): sub-blocks 0-3 keep their 6
// bits in bytes 0-3 (scale) and 4-7 (min); 4-7 put their low nibbles in
// bytes 8-11 and their top 2 bits in the spare top bits of bytes 0-7.
void pack_k4_scales(const uint8_t* ls, const uint8_t* lm, uint8_t* out) {
  for (int j = 0; j < 4; ++j) {
    out[j] = ls[j];
    out[j + 4] = lm[j];
  }
  for (int j = 4; j < 8; ++j) {
    out[j + 4] = static_cast<uint8_t>((ls[j] & 0xF) | ((lm[j] & 0xF) << 4));
    out[j - 4] |= static_cast<uint8_t>((ls[j] >> 4) << 6);
    out[j] |= static_cast<uint8_t>((lm[j] >> 4) << 6);
  }
}

// The part of quantize_row_q4_K_ref / q5_K_ref before bit packing: fits every
// sub-block, writes d, dmin and the scale table into head[0..15], and
// leaves the final levels (0..nmax) of the 256 elements in L.
void encode_k4_levels(const float* x, int nmax, float rmin, int nstep, uint8_t* head, uint8_t* L) {
  float scales[8];
  float mins[8];
  float max_scale = 0;
  float max_min = 0;
  for (int j = 0; j < 8; ++j) {
    const float* xs = x + kSub * j;
    float sum_x2 = 0;
    for (int l = 0; l < kSub; ++l) sum_x2 += xs[l] * xs[l];
    const float av_x = std::sqrt(sum_x2 / static_cast<float>(kSub));
    float weights[kSub];
    for (int l = 0; l < kSub; ++l) weights[l] = av_x + std::fabs(xs[l]);
    scales[j] = fit_scale_and_min(xs, weights, nmax, rmin, 0.1f, nstep, L + kSub * j, &mins[j]);
    if (scales[j] > max_scale) max_scale = scales[j];
    if (mins[j] > max_min) max_min = mins[j];
  }

  const float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
  const float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
  uint8_t ls[8];
  uint8_t lm[8];
  for (int j = 0; j < 8; ++j) {
    // ggml narrows to uint8_t before clamping, so a (rare) negative fit
    // scale wraps to a large byte and then clamps to 63; keep that order.
    ls[j] = std::min<uint8_t>(63, static_cast<uint8_t>(nearest_int(inv_scale * scales[j])));
    lm[j] = std::min<uint8_t>(63, static_cast<uint8_t>(nearest_int(inv_min * mins[j])));
  }
  const uint16_t d_bits = kquant_fp32_to_fp16(max_scale / 63.f);
  const uint16_t dmin_bits = kquant_fp32_to_fp16(max_min / 63.f);
  store_u16(head, d_bits);
  store_u16(head + 2, dmin_bits);
  pack_k4_scales(ls, lm, head + 4);

  // Requantise against the scales as stored (halves, 6-bit multipliers);
  // ls/lm are exactly what the packed table decodes to. A sub-block whose
  // effective scale is zero keeps the levels of its fit.
  const float d_all = half_to_float(d_bits);
  const float dmin_all = half_to_float(dmin_bits);
  for (int j = 0; j < 8; ++j) {
    const float d = d_all * static_cast<float>(ls[j]);
    if (d == 0.0f) continue;
    const float dm = dmin_all * static_cast<float>(lm[j]);
    for (int i = 0; i < kSub; ++i) {
      const int l = nearest_int((x[kSub * j + i] + dm) / d);
      L[kSub * j + i] = static_cast<uint8_t>(clamp_int(l, 0, nmax));
    }
  }
}

// ---- Q6_K: 16 sub-blocks of 16, x ~ scale * (q - 32) ----------------------

constexpr int kSub6 = 16;
constexpr int kNmax6 = 32;

// make_qx_quants for n = 16, nmax = 32 with x^2 weights (rmse_type 1, no
// importance): symmetric levels in [-32, 31] scaled so the largest-magnitude
// element lands on -32, then 18 nearby grids (-(32 + 0.1 k) / max) compared
// by the weighted least-squares criterion sumlx^2 / suml2. L receives the
// levels offset by 32; returns the refitted scale (0 for an all-zero group).
float fit_symmetric(const float* x, int8_t* L) {
  float max = 0;
  float amax = 0;
  for (int i = 0; i < kSub6; ++i) {
    const float ax = std::fabs(x[i]);
    if (ax > amax) {
      amax = ax;
      max = x[i];
    }
  }
  if (amax < kGroupMaxEps) {
    std::memset(L, 0, kSub6);  // not the offset 32: ggml leaves raw zeros here
    return 0.f;
  }

  float iscale = static_cast<float>(-kNmax6) / max;
  float sumlx = 0;
  float suml2 = 0;
  for (int i = 0; i < kSub6; ++i) {
    const int l = clamp_int(nearest_int(iscale * x[i]), -kNmax6, kNmax6 - 1);
    L[i] = static_cast<int8_t>(l + kNmax6);
    const float w = x[i] * x[i];
    const float fl = static_cast<float>(l);
    sumlx += w * x[i] * fl;
    suml2 += w * fl * fl;
  }
  float scale = suml2 != 0.0f ? sumlx / suml2 : 0.0f;
  float best = scale * sumlx;
  for (int k = -9; k <= 9; ++k) {
    if (k == 0) continue;
    iscale = -(static_cast<float>(kNmax6) + 0.1f * static_cast<float>(k)) / max;
    sumlx = 0;
    suml2 = 0;
    for (int i = 0; i < kSub6; ++i) {
      const int l = clamp_int(nearest_int(iscale * x[i]), -kNmax6, kNmax6 - 1);
      const float w = x[i] * x[i];
      const float fl = static_cast<float>(l);
      sumlx += w * x[i] * fl;
      suml2 += w * fl * fl;
    }
    // Compare sumlx^2 / suml2 without dividing, as ggml does.
    if (suml2 > 0 && sumlx * sumlx > best * suml2) {
      for (int i = 0; i < kSub6; ++i) {
        const int l = clamp_int(nearest_int(iscale * x[i]), -kNmax6, kNmax6 - 1);
        L[i] = static_cast<int8_t>(l + kNmax6);
      }
      scale = sumlx / suml2;
      best = scale * sumlx;
    }
  }
  return scale;
}

void encode_q6_k_block(const float* x, uint8_t* y) {
  int8_t L[kKQuantBlock];
  float scales[kSub6];
  float max_scale = 0;
  float max_abs_scale = 0;
  for (int ib = 0; ib < kSub6; ++ib) {
    scales[ib] = fit_symmetric(x + kSub6 * ib, L + kSub6 * ib);
    const float abs_scale = std::fabs(scales[ib]);
    if (abs_scale > max_abs_scale) {
      max_abs_scale = abs_scale;
      max_scale = scales[ib];
    }
  }
  if (max_abs_scale < kGroupMaxEps) {
    std::memset(y, 0, kQ6KBytes);  // d = +0 as a half is all-zero bits too
    return;
  }

  uint8_t* ql = y;
  uint8_t* qh = y + 128;
  int8_t sc[kSub6];
  // Signed: the sub-block with the largest |scale| maps to -128, so d may be
  // negative.
  const float iscale = -128.f / max_scale;
  const uint16_t d_bits = kquant_fp32_to_fp16(1.0f / iscale);
  for (int ib = 0; ib < kSub6; ++ib)
    sc[ib] = static_cast<int8_t>(std::min(127, nearest_int(iscale * scales[ib])));

  const float d_all = half_to_float(d_bits);
  for (int j = 0; j < kSub6; ++j) {
    const float d = d_all * static_cast<float>(sc[j]);
    if (d == 0.0f) continue;  // keep the fit's levels, as ggml does
    for (int i = 0; i < kSub6; ++i) {
      const int l = clamp_int(nearest_int(x[kSub6 * j + i] / d), -32, 31);
      L[kSub6 * j + i] = static_cast<int8_t>(l + 32);
    }
  }

  // Each 128-element half: elements l, l+32, l+64, l+96 share the low
  // nibbles of ql[l] / ql[l+32] and one qh byte (2 bits each).
  for (int half = 0; half < 2; ++half, ql += 64, qh += 32) {
    const int8_t* q = L + 128 * half;
    for (int l = 0; l < 32; ++l) {
      ql[l] = static_cast<uint8_t>((q[l] & 0xF) | ((q[l + 64] & 0xF) << 4));
      ql[l + 32] = static_cast<uint8_t>((q[l + 32] & 0xF) | ((q[l + 96] & 0xF) << 4));
      qh[l] = static_cast<uint8_t>((q[l] >> 4) | ((q[l + 32] >> 4) << 2) | ((q[l + 64] >> 4) << 4) |
                                   ((q[l + 96] >> 4) << 6));
    }
  }
  std::memcpy(y + 192, sc, kSub6);
  store_u16(y + 208, d_bits);
}

}  // namespace

uint16_t kquant_fp32_to_fp16(float x) {
  const uint32_t w = bits_of(x);
  const uint16_t sign = static_cast<uint16_t>((w >> 16) & 0x8000u);
  const uint32_t a = w & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return sign | 0x7E00u;  // ggml drops NaN payloads
  // 65520 (half way between 65504 and 2^16) and above round to infinity.
  if (a >= 0x477FF000u) return sign | 0x7C00u;
  const uint32_t exp = a >> 23;
  uint32_t mant;
  int shift;
  uint32_t h;
  if (exp >= 113) {  // a normal half: rebias the exponent, drop 13 bits
    mant = a & 0x007FFFFFu;
    shift = 13;
    h = ((exp - 112u) << 10) | (mant >> shift);
  } else {
    // Subnormal half (units of 2^-24) or zero; below 2^-25 nothing survives
    // (exactly 2^-25 is a tie that goes to the even value 0).
    if (exp < 102) return sign;
    mant = (a & 0x007FFFFFu) | 0x00800000u;
    shift = static_cast<int>(126u - exp);  // 14..24
    h = mant >> shift;
  }
  const uint32_t rest = mant & ((1u << shift) - 1u);
  const uint32_t halfway = 1u << (shift - 1);
  // A carry out of the mantissa correctly bumps the exponent.
  if (rest > halfway || (rest == halfway && (h & 1u))) ++h;
  return static_cast<uint16_t>(sign | h);
}

void quantize_q4_k(const float* src, int64_t n_blocks, uint8_t* dst) {
  uint8_t L[kKQuantBlock];
  for (int64_t b = 0; b < n_blocks; ++b, src += kKQuantBlock, dst += kQ4KBytes) {
    encode_k4_levels(src, 15, -1.f, 20, dst, L);
    // 32 bytes per pair of sub-blocks: the first in the low nibbles.
    uint8_t* qs = dst + 16;
    for (int p = 0; p < 4; ++p, qs += 32) {
      const uint8_t* q = L + 64 * p;
      for (int l = 0; l < 32; ++l) qs[l] = static_cast<uint8_t>(q[l] | (q[l + 32] << 4));
    }
  }
}

void quantize_q5_k(const float* src, int64_t n_blocks, uint8_t* dst) {
  uint8_t L[kKQuantBlock];
  for (int64_t b = 0; b < n_blocks; ++b, src += kKQuantBlock, dst += kQ5KBytes) {
    encode_k4_levels(src, 31, -0.5f, 15, dst, L);
    // As Q4_K's nibbles, plus the fifth bit of sub-block s in bit s of qh.
    uint8_t* qh = dst + 16;
    uint8_t* qs = dst + 48;
    std::memset(qh, 0, 32);
    for (int p = 0; p < 4; ++p, qs += 32) {
      const uint8_t* q = L + 64 * p;
      const uint8_t lo_bit = static_cast<uint8_t>(1u << (2 * p));
      const uint8_t hi_bit = static_cast<uint8_t>(2u << (2 * p));
      for (int l = 0; l < 32; ++l) {
        if (q[l] > 15) qh[l] |= lo_bit;
        if (q[l + 32] > 15) qh[l] |= hi_bit;
        qs[l] = static_cast<uint8_t>((q[l] & 0xF) | ((q[l + 32] & 0xF) << 4));
      }
    }
  }
}

void quantize_q6_k(const float* src, int64_t n_blocks, uint8_t* dst) {
  for (int64_t b = 0; b < n_blocks; ++b)
    encode_q6_k_block(src + b * kKQuantBlock, dst + b * kQ6KBytes);
}

}  // namespace qlora::io::detail
