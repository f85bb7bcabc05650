// C++ entry points of ggml_matmul's autograd beyond the registered op.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string_view>

namespace qlora::detail {

// ggml_matmul(x, blocks, ...) whose value is `output`, the same product
// computed earlier without grad, and whose gradient is ggml_matmul's: the
// replay of selective recomputation (matmul_4bit_replay's twin).
at::Tensor ggml_matmul_replay(const at::Tensor& x, const at::Tensor& blocks,
                              std::string_view ggml_type, at::IntArrayRef shape,
                              const std::optional<at::Tensor>& bias, const at::Tensor& output);

}  // namespace qlora::detail
