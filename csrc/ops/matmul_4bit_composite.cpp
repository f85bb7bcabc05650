// The device-generic matmul_4bit (registered for CUDA in cuda/cuda_ops.cpp): single-row inputs go
// to the fused gemv_4bit kernel, everything else dequantises the weight once into the input dtype
// and runs the backend's GEMM. Both call the qlora ops through the dispatcher, so each device gets
// its own kernels.
#include <ATen/core/Tensor.h>
#include <ATen/ops/linear.h>
#include <torch/library.h>

#include "ops/checks.h"
#include "ops/code_tables.h"
#include "ops/matmul_4bit_composite.h"
#include "qlora/ops.h"

namespace qlora {

namespace detail {

at::Tensor matmul_4bit_composite(const at::Tensor& x, const at::Tensor& B, const at::Tensor& absmax,
                                 int64_t blocksize, std::string_view quant_type,
                                 c10::SymIntArrayRef shapeB,
                                 const std::optional<at::Tensor>& bias) {
  check_matmul_4bit(x, B, absmax, blocksize, quant_type, shapeB, bias);
  const bool has_bias = bias.has_value() && bias->defined();
  if (x.scalar_type() != at::kDouble && x.numel() > 0 && x.numel() == x.size(-1)) {
    const at::Tensor code = code_table_on(quant_type, x.device());
    at::Tensor y = gemv_4bit(x, B, C10_AS_INTARRAYREF_SLOW(shapeB), absmax, code, blocksize);
    return has_bias ? y.add_(*bias) : y;
  }
  return at::linear(
      x, dequantize_weight_as(B, absmax, blocksize, quant_type, shapeB, x.scalar_type()), bias);
}

at::Tensor dequantize_weight_as(const at::Tensor& B, const at::Tensor& absmax, int64_t blocksize,
                                std::string_view quant_type, c10::SymIntArrayRef shapeB,
                                at::ScalarType dtype) {
  if (dtype == at::kDouble)
    return dequantize_4bit_symint(B, absmax, blocksize, quant_type, shapeB, at::kFloat)
        .to(at::kDouble);
  return dequantize_4bit_symint(B, absmax, blocksize, quant_type, shapeB, dtype);
}

at::Tensor nested_float_absmax(const at::Tensor& absmax_8bit, const at::Tensor& nested_absmax,
                               const at::Tensor& absmax_code, const at::Tensor& absmax_offset) {
  return dequantize_blockwise(absmax_8bit, nested_absmax, absmax_code, 256, at::kFloat)
      .add_(absmax_offset);
}

at::Tensor gemm_4bit_composite(const at::Tensor& A, const at::Tensor& B, c10::SymIntArrayRef shapeB,
                               const at::Tensor& absmax, int64_t blocksize,
                               std::string_view quant_type, const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& absmax_8bit,
                               const std::optional<at::Tensor>& absmax_code,
                               const std::optional<at::Tensor>& absmax_offset) {
  check_gemm_4bit(A, B, shapeB, absmax, blocksize, quant_type, bias, absmax_8bit, absmax_code,
                  absmax_offset);
  const bool nested = absmax_8bit.has_value() && absmax_8bit->defined();
  const at::Tensor scales =
      nested ? nested_float_absmax(*absmax_8bit, absmax, *absmax_code, *absmax_offset) : absmax;
  return matmul_4bit(A, B, scales, blocksize, quant_type, C10_AS_INTARRAYREF_SLOW(shapeB), bias);
}

}  // namespace detail

// The CPU's gemm_4bit: the statistics pass reads 1/64 of what the GEMM reads.
TORCH_LIBRARY_IMPL(qlora, CPU, m) { m.impl("gemm_4bit", &detail::gemm_4bit_composite); }

}  // namespace qlora
