// CPU kernels of the fused optimizer updates: each element is read, updated
// (common/adamw_math.h) and written once; in 8-bit mode each 256-element
// block is dequantised, updated and re-quantised in one pass with the
// quantize_blockwise rule, so the result equals dequantise -> update ->
// quantize_blockwise bit for bit without the float32 copies of the states.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <array>

#include "common/adamw_math.h"
#include "cpu/cpu_utils.h"
#include "cpu/nearest_code.h"
#include "ops/optimizer_checks.h"

namespace qlora::cpu {
namespace {

using detail::AdamWScalars;
using detail::kOptimizerBlock;

template <typename T>
void update_32bit(const T* g, T* p, float* m, float* v, int64_t n, const AdamWScalars& s) {
  at::parallel_for(0, n, kGrainElements, [&](int64_t begin, int64_t end) {
    // p is stored back unconditionally: a skipped element's float round-trips exactly.
    for (int64_t i = begin; i < end; ++i) {
      float pi = static_cast<float>(p[i]);
      detail::adamw_element(static_cast<float>(g[i]), pi, m[i], v[i], s);
      p[i] = round_to<T>(pi);
    }
  });
}

void optimizer_update_32bit_cpu(std::string_view optimizer_name, at::Tensor& g, at::Tensor& p,
                                at::Tensor& state1, const std::optional<at::Tensor>& state2,
                                const std::optional<at::Tensor>& unorm_vec, double max_unorm,
                                double /*param_norm*/, double beta1, double beta2, double /*beta3*/,
                                double /*alpha*/, double eps, double weight_decay, int64_t step,
                                double lr, double gnorm_scale, bool skip_zeros) {
  detail::check_optimizer_update_32bit(optimizer_name, g, p, state1, state2, unorm_vec, max_unorm,
                                       step);
  TORCH_CHECK(p.device().is_cpu(), "qlora::optimizer_update_32bit (CPU kernel): p must be on CPU");
  const AdamWScalars s = detail::make_adamw_scalars(beta1, beta2, eps, weight_decay, step, lr,
                                                    gnorm_scale, skip_zeros);
  at::Tensor v = *state2;
  dispatch_float_types(p.scalar_type(), "optimizer_update_32bit", [&](auto tag) {
    using T = decltype(tag);
    update_32bit<T>(g.const_data_ptr<T>(), p.mutable_data_ptr<T>(),
                    state1.mutable_data_ptr<float>(), v.mutable_data_ptr<float>(), p.numel(), s);
  });
}

// quantize_blockwise's decision boundaries: (code[:-1] + code[1:]) / 2.
std::array<float, 255> boundaries_of_ptr(const float* q) {
  std::array<float, 255> b{};
  for (int i = 0; i < 255; ++i) b[i] = (q[i] + q[i + 1]) / 2.0f;
  return b;
}

// Re-quantises x[0..len) into codes and absmax as quantize_blockwise would;
// false when the block holds inf/NaN.
bool requantize_block(const float* x, int64_t len, const NearestCodeTable& table, uint8_t* codes,
                      float* absmax) {
  uint32_t bits = 0;
  for (int64_t i = 0; i < len; ++i) bits = std::max(bits, detail::abs_bits(x[i]));
  if (bits >= detail::kNonFiniteBits) return false;
  const float amax = detail::bits_float(bits);
  const bool partial = len < kOptimizerBlock;
  *absmax = partial ? std::max(amax, detail::kMinAbsmax) : amax;
  const float inv = detail::reciprocal_scale(amax);
  for (int64_t i = 0; i < len; ++i)
    codes[i] = table.encode(partial ? detail::normalise_partial(x[i], amax)
                                    : detail::normalise_full(x[i], inv));
  return true;
}

template <typename T>
void update_8bit(const T* g, T* p, uint8_t* q1, uint8_t* q2, const float* map1, const float* map2,
                 float* absmax1, float* absmax2, int64_t n, const AdamWScalars& s) {
  const auto table1 = NearestCodeTable::for_bounds(boundaries_of_ptr(map1));
  const auto table2 = NearestCodeTable::for_bounds(boundaries_of_ptr(map2));
  const int64_t blocks = detail::ceil_div(n, kOptimizerBlock);
  FirstBadBlock bad;
  at::parallel_for(0, blocks, grain_in_blocks(kOptimizerBlock), [&](int64_t begin, int64_t end) {
    float m[kOptimizerBlock], v[kOptimizerBlock];
    for (int64_t b = begin; b < end; ++b) {
      const int64_t start = b * kOptimizerBlock;
      const int64_t len = std::min(kOptimizerBlock, n - start);
      for (int64_t i = 0; i < len; ++i) {
        m[i] = map1[q1[start + i]] * absmax1[b];
        v[i] = map2[q2[start + i]] * absmax2[b];
      }
      for (int64_t i = 0; i < len; ++i) {
        float pi = static_cast<float>(p[start + i]);
        detail::adamw_element(static_cast<float>(g[start + i]), pi, m[i], v[i], s);
        p[start + i] = round_to<T>(pi);
      }
      if (!requantize_block(m, len, *table1, q1 + start, absmax1 + b) ||
          !requantize_block(v, len, *table2, q2 + start, absmax2 + b))
        bad.report(b);
    }
  });
  bad.raise_if_any("optimizer_update_8bit_blockwise", kOptimizerBlock);
}

void optimizer_update_8bit_blockwise_cpu(std::string_view optimizer_name, at::Tensor& g,
                                         at::Tensor& p, at::Tensor& state1,
                                         const std::optional<at::Tensor>& state2, double beta1,
                                         double beta2, double /*beta3*/, double /*alpha*/,
                                         double eps, int64_t step, double lr, at::Tensor& qmap1,
                                         const std::optional<at::Tensor>& qmap2,
                                         at::Tensor& absmax1,
                                         const std::optional<at::Tensor>& absmax2,
                                         double weight_decay, double gnorm_scale, bool skip_zeros) {
  detail::check_optimizer_update_8bit_blockwise(optimizer_name, g, p, state1, state2, step, qmap1,
                                                qmap2, absmax1, absmax2);
  TORCH_CHECK(p.device().is_cpu(),
              "qlora::optimizer_update_8bit_blockwise (CPU kernel): p must be on CPU");
  const AdamWScalars s = detail::make_adamw_scalars(beta1, beta2, eps, weight_decay, step, lr,
                                                    gnorm_scale, skip_zeros);
  at::Tensor q2 = *state2, a2 = *absmax2;
  const at::Tensor map1 = qmap1.contiguous(), map2 = qmap2->contiguous();
  dispatch_float_types(p.scalar_type(), "optimizer_update_8bit_blockwise", [&](auto tag) {
    using T = decltype(tag);
    update_8bit<T>(g.const_data_ptr<T>(), p.mutable_data_ptr<T>(),
                   state1.mutable_data_ptr<uint8_t>(), q2.mutable_data_ptr<uint8_t>(),
                   map1.const_data_ptr<float>(), map2.const_data_ptr<float>(),
                   absmax1.mutable_data_ptr<float>(), a2.mutable_data_ptr<float>(), p.numel(), s);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora, CPU, m) {
  m.impl("optimizer_update_32bit", &optimizer_update_32bit_cpu);
  m.impl("optimizer_update_8bit_blockwise", &optimizer_update_8bit_blockwise_cpu);
}

}  // namespace qlora::cpu
