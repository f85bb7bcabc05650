// The device-generic matmul_4bit (registered for CUDA in cuda/cuda_ops.cpp): single-row inputs go
// to the fused gemv_4bit kernel, everything else dequantises the weight once into the input dtype
// and runs the backend's GEMM. Both call the qlora ops through the dispatcher, so each device gets
// its own kernels.
#include <ATen/core/Tensor.h>
#include <ATen/ops/linear.h>

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

}  // namespace detail

}  // namespace qlora
