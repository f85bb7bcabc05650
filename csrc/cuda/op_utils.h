// Tensor-to-launcher glue shared by the CUDA dispatch-key kernels
// (cuda_ops.cpp, optimizer_ops.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/full.h>

#include <limits>

#include "cuda/launchers.h"
#include "ops/checks.h"

namespace qlora::cuda {

inline Dtype to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return Dtype::kFloat32;
    case at::kHalf:
      return Dtype::kFloat16;
    case at::kBFloat16:
      return Dtype::kBFloat16;
    default:
      TORCH_CHECK(false, "qlora CUDA kernels: unsupported dtype ", t);
  }
}

inline void require_cuda(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "qlora::", op, " (CUDA kernel): ", name, " must be a CUDA tensor, got ",
              t.device());
}

// Lowest bad block, or INT64_MAX; the device flag is read back once (a sync)
// so a non-finite input is an error, not silent garbage codes.
inline at::Tensor new_bad_block_flag(const at::Tensor& like) {
  return at::full({1}, std::numeric_limits<int64_t>::max(), like.options().dtype(at::kLong));
}
inline void raise_if_bad(const char* op, const at::Tensor& flag, int64_t blocksize) {
  const int64_t bad = flag.item<int64_t>();
  if (bad != std::numeric_limits<int64_t>::max()) detail::fail_non_finite(op, bad, blocksize);
}
inline unsigned long long* flag_ptr(at::Tensor& flag) {
  return reinterpret_cast<unsigned long long*>(flag.mutable_data_ptr<int64_t>());
}

}  // namespace qlora::cuda
