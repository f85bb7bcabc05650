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

// First-level absmax of double-quantised statistics, in bitsandbytes'
// order: dequantize_blockwise(absmax_8bit, nested_absmax, code, 256) + offset.
at::Tensor nested_float_absmax(const at::Tensor& absmax_8bit, const at::Tensor& nested_absmax,
                               const at::Tensor& absmax_code, const at::Tensor& absmax_offset);

// The device-generic gemm_4bit (the CPU kernel; CUDA's fuses the nested
// statistics into its dequantisation): float absmax, then matmul_4bit.
at::Tensor gemm_4bit_composite(const at::Tensor& A, const at::Tensor& B, c10::SymIntArrayRef shapeB,
                               const at::Tensor& absmax, int64_t blocksize,
                               std::string_view quant_type, const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& absmax_8bit,
                               const std::optional<at::Tensor>& absmax_code,
                               const std::optional<at::Tensor>& absmax_offset);

}  // namespace qlora::detail
