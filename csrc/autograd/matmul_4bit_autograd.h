// C++ entry points of matmul_4bit's autograd beyond the registered op.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string_view>

namespace qlora::detail {

// matmul_4bit(x, B, ...) whose value is `output`, a product computed
// earlier on the same operands (recorded without grad), and whose gradient
// is matmul_4bit's: selective recomputation replays the frozen matmuls of
// a checkpointed layer instead of running them twice.
at::Tensor matmul_4bit_replay(const at::Tensor& x, const at::Tensor& B, const at::Tensor& absmax,
                              int64_t blocksize, std::string_view quant_type,
                              at::IntArrayRef shapeB, const std::optional<at::Tensor>& bias,
                              const at::Tensor& output);

}  // namespace qlora::detail
