// The device-generic matmul_4bit: fused gemv for single rows, otherwise
// dequantize + the backend's GEMM. CUDA uses it as is; the CPU kernel uses
// it for float64 (gradcheck) inputs.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/SymInt.h>

#include <optional>
#include <string_view>

namespace qlora::detail {

at::Tensor matmul_4bit_composite(const at::Tensor& x, const at::Tensor& B, const at::Tensor& absmax,
                                 int64_t blocksize, std::string_view quant_type,
                                 c10::SymIntArrayRef shapeB, const std::optional<at::Tensor>& bias);

// dequant(W) in `dtype`; float64 (for gradcheck) goes through float32, the
// widest dtype the 4-bit kernels produce, and is exact in float64.
at::Tensor dequantize_weight_as(const at::Tensor& B, const at::Tensor& absmax, int64_t blocksize,
                                std::string_view quant_type, c10::SymIntArrayRef shapeB,
                                at::ScalarType dtype);

}  // namespace qlora::detail
