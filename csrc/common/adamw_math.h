// Per-element AdamW update of the fused optimizer ops (optimizer_update_32bit
// and optimizer_update_8bit_blockwise), shared by the CPU and CUDA kernels.
// Every product, sum and quotient is rounded to float32 on its own (both
// builds forbid contraction into FMAs), so the update is the same bits on
// every CPU level and on the GPU, and equals the chain of separate ATen ops
// PagedAdamW runs when it is not fused (optim/paged_adamw.cpp).
#pragma once

#include <cmath>
#include <cstdint>

#include "common/host_device.h"
#include "common/quant_math.h"

namespace qlora::detail {

// The step's constants, rounded to float32 once on the host, as ATen rounds
// a double scalar operand of a float32 tensor op.
struct AdamWScalars {
  float beta1, one_minus_beta1;
  float beta2, one_minus_beta2;
  float decay;             // 1 - lr * weight_decay
  float sqrt_correction2;  // sqrt(1 - beta2^step)
  float eps;
  float neg_step_size;  // -lr / (1 - beta1^step)
  float gnorm_scale;
  bool apply_decay;     // weight_decay != 0
  bool scale_gradient;  // gnorm_scale != 1
  bool skip_zeros;      // bitsandbytes' skip_zeros: g == 0 leaves the element alone
};

inline AdamWScalars make_adamw_scalars(double beta1, double beta2, double eps, double weight_decay,
                                       int64_t step, double lr, double gnorm_scale,
                                       bool skip_zeros) {
  AdamWScalars s{};
  s.beta1 = static_cast<float>(beta1);
  s.one_minus_beta1 = static_cast<float>(1 - beta1);
  s.beta2 = static_cast<float>(beta2);
  s.one_minus_beta2 = static_cast<float>(1 - beta2);
  s.decay = static_cast<float>(1 - lr * weight_decay);
  s.sqrt_correction2 =
      static_cast<float>(std::sqrt(1 - std::pow(beta2, static_cast<double>(step))));
  s.eps = static_cast<float>(eps);
  s.neg_step_size = static_cast<float>(-lr / (1 - std::pow(beta1, static_cast<double>(step))));
  s.gnorm_scale = static_cast<float>(gnorm_scale);
  s.apply_decay = weight_decay != 0;
  s.scale_gradient = gnorm_scale != 1;
  s.skip_zeros = skip_zeros;
  return s;
}

QLORA_HD bool is_finite_float(float x) { return abs_bits(x) < kNonFiniteBits; }

// One element: returns false (and leaves p, m, v as they were) for a
// gradient element that is inf/NaN, or zero under skip_zeros. Branch-free
// (the update is computed, then selected), so the CPU loops vectorise.
QLORA_HD bool adamw_element(float g, float& p, float& m, float& v, const AdamWScalars& s) {
  const bool apply = is_finite_float(g) && !(s.skip_zeros && g == 0.f);
  const float gs = s.scale_gradient ? g * s.gnorm_scale : g;
  const float pd = s.apply_decay ? p * s.decay : p;
  const float m_decayed = m * s.beta1;
  const float g_part = gs * s.one_minus_beta1;
  const float m_new = m_decayed + g_part;
  const float v_decayed = v * s.beta2;
  const float g_sq = gs * gs;
  const float g_sq_part = g_sq * s.one_minus_beta2;
  const float v_new = v_decayed + g_sq_part;
#if defined(__CUDA_ARCH__)
  const float root = __fsqrt_rn(v_new);
#else
  const float root = std::sqrt(v_new);
#endif
  const float scaled_root = root / s.sqrt_correction2;
  const float denom = scaled_root + s.eps;
  const float ratio = m_new / denom;
  const float delta = ratio * s.neg_step_size;
  const float p_new = pd + delta;
  m = apply ? m_new : m;
  v = apply ? v_new : v;
  p = apply ? p_new : p;
  return apply;
}

// The code of one 8-bit state element when its block is re-quantised
// (quantize_blockwise's rule: normalise by the block's absmax, nearest code).
// The CUDA kernel searches the boundaries with encode_8bit; the CPU kernel
// reaches the same code through cpu/nearest_code.h's table.
QLORA_HD uint8_t encode_state_8bit(float x, float absmax, float inv_absmax, bool partial,
                                   const float* bounds255) {
  return encode_8bit(partial ? normalise_partial(x, absmax) : normalise_full(x, inv_absmax),
                     bounds255);
}

}  // namespace qlora::detail
