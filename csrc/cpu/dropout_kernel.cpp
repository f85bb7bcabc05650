#include "dropout_kernel.h"

#include <ATen/Parallel.h>

#include <algorithm>

#include "cpu_utils.h"
#include "isa_kernels.h"

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

}  // namespace qlora::cpu
