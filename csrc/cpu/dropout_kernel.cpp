#include "cpu/dropout_kernel.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>

#include "cpu/cpu_utils.h"
#include "cpu/isa_kernels.h"
#include "ops/checks.h"

namespace qlora::cpu {

void dropout_apply(const float* in, float* out, int64_t n, int64_t i0,
                   const detail::DropoutKey& key) {
  const IsaKernels& k = isa_kernels();
  at::parallel_for(0, n, kGrainElements, [&](int64_t begin, int64_t end) {
    const float* src = in + begin;
    float* dst = out + begin;
    uint64_t first = static_cast<uint64_t>(i0 + begin);
    // Split where the index's low word wraps, so each run has one high word.
    for (int64_t left = end - begin; left > 0;) {
      const uint64_t to_wrap = (uint64_t{1} << 32) - static_cast<uint32_t>(first);
      const int64_t run =
          static_cast<int64_t>(std::min<uint64_t>(static_cast<uint64_t>(left), to_wrap));
      k.dropout_run(src, dst, run, first, key);
      src += run, dst += run, left -= run, first += static_cast<uint64_t>(run);
    }
  });
}

namespace {

at::Tensor hash_dropout_cpu(const at::Tensor& input, double p, int64_t seed) {
  detail::check_hash_dropout(input, p);
  const at::Tensor src = input.contiguous();
  at::Tensor out = at::empty_like(src, at::MemoryFormat::Contiguous);
  const detail::DropoutKey key = detail::dropout_key(static_cast<uint64_t>(seed), p);
  if (src.scalar_type() == at::kFloat) {
    dropout_apply(src.const_data_ptr<float>(), out.mutable_data_ptr<float>(), src.numel(), 0, key);
    return out;
  }
  // 16-bit and float64 inputs: the same mask, products in the input's
  // accumulation type, rounded once.
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "hash_dropout", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t scale = static_cast<acc_t>(1.0 / (1.0 - p));
    const scalar_t* in = src.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, src.numel(), kGrainElements, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        dst[i] = detail::dropout_keeps(key, static_cast<uint64_t>(i))
                     ? static_cast<scalar_t>(static_cast<acc_t>(in[i]) * scale)
                     : static_cast<scalar_t>(0);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora, CPU, m) { m.impl("hash_dropout", &hash_dropout_cpu); }

}  // namespace qlora::cpu
