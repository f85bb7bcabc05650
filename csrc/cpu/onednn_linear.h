// Dense y = x W^T on the CPU through oneDNN (bundled in LibTorch, reached via
// the `mkldnn::_linear_pointwise` op that torch.compile's CPU backend uses).
// It reads a transposed weight in place (the backward's W^T needs no copy)
// and multiplies bfloat16 operands with AMX / AVX512-BF16 where the CPU has
// them; for float32 it is on par with the MKL GEMM behind at::linear on the
// CPUs measured (benchmarks/RESULTS.md).
#pragma once

#include <ATen/core/Tensor.h>

namespace qlora::cpu {

// True unless QLORA_ONEDNN=0 or set_onednn_enabled(false); benchmarks and
// tests switch it off to compare against at::linear.
bool onednn_enabled();
void set_onednn_enabled(bool enabled);

// Whether oneDNN GEMMs are enabled and available for this dtype (float32,
// bfloat16).
bool onednn_dtype_supported(at::ScalarType dtype);

// Whether onednn_linear takes these operands: enabled, the op is present,
// CPU float32 or bfloat16 tensors of one dtype, W two-dimensional.
bool onednn_linear_supported(const at::Tensor& x, const at::Tensor& w);

// x [..., K] times W^T (W [N, K], any strides) -> [..., N], no autograd.
at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& w);

}  // namespace qlora::cpu

namespace qlora::detail {

// A real CPU tensor: not traced (FakeTensor, symbolic sizes under
// torch.compile / AOT autograd), so a kernel may read its memory directly;
// traced ones must take the dispatcher route.
bool is_plain_cpu_tensor(const at::Tensor& t);

// y = x W^T without bias: oneDNN where supported, at::linear otherwise (other
// devices and dtypes). Not differentiable through the oneDNN path: callers
// are kernels and autograd functions.
at::Tensor dense_linear(const at::Tensor& x, const at::Tensor& w);

}  // namespace qlora::detail
