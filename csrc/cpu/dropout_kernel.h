// CPU dropout from the counter-based mask of common/dropout_hash.h.
#pragma once

#include <cstdint>

#include "common/dropout_hash.h"

namespace qlora::cpu {

// out[i] = keeps(i0 + i) ? in[i] * scale : 0 for i in [0, n), in parallel;
// in and out may be the same buffer.
void dropout_apply(const float* in, float* out, int64_t n, int64_t i0,
                   const detail::DropoutKey& key);

}  // namespace qlora::cpu
