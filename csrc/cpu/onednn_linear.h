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

// Whether bfloat16 operands multiply in bfloat16 here: oneDNN with
// AVX512-BF16 (AMX where present), at capability level avx512_bf16. Below
// it, bfloat16 and float16 GEMMs compute in float32 from converted tiles.
bool native_bf16_gemm();

// Whether onednn_linear takes these operands: enabled, the op is present,
// CPU float32 or bfloat16 tensors of one dtype, W two-dimensional.
bool onednn_linear_supported(const at::Tensor& x, const at::Tensor& w);

// x [..., K] times W^T (W [N, K], any strides) -> [..., N], no autograd.
at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& w);

// y = x W^T without bias on plain CPU tensors (ops/dense_linear.h checks):
// float32 through oneDNN; bfloat16 through oneDNN's bfloat16 GEMM where
// native_bf16_gemm(), else (and float16 always) in float32 over converted
// weight tiles, rounded once. Other dtypes and shapes: at::linear.
at::Tensor dense_linear_cpu(const at::Tensor& x, const at::Tensor& w);

}  // namespace qlora::cpu
