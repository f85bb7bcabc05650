// The dense GEMM of the kernels and autograd functions (matmul_4bit's
// backward, the fused linear + cross-entropy): plain CPU tensors take
// oneDNN (cpu/onednn_linear.h), everything else at::linear. Not
// differentiable through the CPU path: callers are kernels and autograd
// functions, never user code.
#pragma once

#include <ATen/core/Tensor.h>

namespace qlora::detail {

// A real CPU tensor: not traced (FakeTensor, symbolic sizes under
// torch.compile / AOT autograd), so a kernel may read its memory directly;
// traced ones must take the dispatcher route.
bool is_plain_cpu_tensor(const at::Tensor& t);

// y = x W^T without bias.
at::Tensor dense_linear(const at::Tensor& x, const at::Tensor& w);

}  // namespace qlora::detail
