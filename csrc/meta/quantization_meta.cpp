// Meta kernels: output shapes and dtypes only, with SymInt sizes, so
// torch.compile / torch.export trace every qlora op (dynamic shapes too).
// They run the same argument checks as the real kernels.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <vector>

#include "ops/checks.h"

namespace qlora::meta {
namespace {

std::tuple<at::Tensor, at::Tensor> quantize_4bit_meta(const at::Tensor& A, int64_t blocksize,
                                                      std::string_view quant_type,
                                                      at::ScalarType quant_storage) {
  detail::check_quantize_4bit(A, blocksize, quant_type, quant_storage);
  const c10::SymInt n = A.sym_numel();
  const int64_t esize = static_cast<int64_t>(c10::elementSize(quant_storage));
  at::Tensor packed =
      at::empty_symint({detail::packed_bytes(n) / esize, 1}, A.options().dtype(quant_storage));
  at::Tensor absmax =
      at::empty_symint({detail::num_blocks(n, blocksize)}, A.options().dtype(at::kFloat));
  return {packed, absmax};
}

at::Tensor dequantize_4bit_meta(const at::Tensor& A, const at::Tensor& absmax, int64_t blocksize,
                                std::string_view quant_type, c10::SymIntArrayRef shape,
                                at::ScalarType dtype) {
  detail::check_dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype);
  return at::empty_symint(shape, A.options().dtype(dtype));
}

void dequantize_4bit_out_meta(const at::Tensor& A, const at::Tensor& absmax, int64_t blocksize,
                              std::string_view quant_type, c10::SymIntArrayRef shape,
                              at::ScalarType dtype, at::Tensor& out) {
  detail::check_dequantize_4bit_out(A, absmax, blocksize, quant_type, shape, dtype, out);
}

std::tuple<at::Tensor, at::Tensor> quantize_blockwise_meta(const at::Tensor& A,
                                                           const at::Tensor& code,
                                                           int64_t blocksize) {
  detail::check_quantize_blockwise(A, code, blocksize);
  at::Tensor out = at::empty_symint(A.sym_sizes(), A.options().dtype(at::kByte));
  at::Tensor absmax = at::empty_symint({detail::num_blocks(A.sym_numel(), blocksize)},
                                       A.options().dtype(at::kFloat));
  return {out, absmax};
}

at::Tensor dequantize_blockwise_meta(const at::Tensor& A, const at::Tensor& absmax,
                                     const at::Tensor& code, int64_t blocksize,
                                     at::ScalarType dtype) {
  detail::check_dequantize_blockwise(A, absmax, code, blocksize, dtype);
  return at::empty_symint(A.sym_sizes(), A.options().dtype(dtype));
}

std::vector<c10::SymInt> linear_output_shape(const at::Tensor& x, const c10::SymInt& out_features) {
  std::vector<c10::SymInt> shape(x.sym_sizes().begin(), x.sym_sizes().end() - 1);
  shape.push_back(out_features);
  return shape;
}

at::Tensor gemv_4bit_meta(const at::Tensor& A, const at::Tensor& B, c10::SymIntArrayRef shapeB,
                          const at::Tensor& absmax, const at::Tensor& code, int64_t blocksize) {
  detail::check_gemv_4bit(A, B, shapeB, absmax, code, blocksize);
  return at::empty_symint(linear_output_shape(A, shapeB[0]), A.options());
}

void gemv_4bit_out_meta(const at::Tensor& A, const at::Tensor& B, c10::SymIntArrayRef shapeB,
                        const at::Tensor& absmax, const at::Tensor& code, int64_t blocksize,
                        at::Tensor& out) {
  detail::check_gemv_4bit_out(A, B, shapeB, absmax, code, blocksize, out);
}

void dequantize_blockwise_out_meta(const at::Tensor& A, const at::Tensor& absmax,
                                   const at::Tensor& code, int64_t blocksize, at::ScalarType dtype,
                                   at::Tensor& out) {
  detail::check_dequantize_blockwise_out(A, absmax, code, blocksize, dtype, out);
}

at::Tensor gemm_4bit_meta(const at::Tensor& A, const at::Tensor& B, c10::SymIntArrayRef shapeB,
                          const at::Tensor& absmax, int64_t blocksize, std::string_view quant_type,
                          const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& absmax_8bit,
                          const std::optional<at::Tensor>& absmax_code,
                          const std::optional<at::Tensor>& absmax_offset) {
  detail::check_gemm_4bit(A, B, shapeB, absmax, blocksize, quant_type, bias, absmax_8bit,
                          absmax_code, absmax_offset);
  return at::empty_symint(linear_output_shape(A, shapeB[0]), A.options());
}

at::Tensor matmul_4bit_meta(const at::Tensor& x, const at::Tensor& B, const at::Tensor& absmax,
                            int64_t blocksize, std::string_view quant_type,
                            c10::SymIntArrayRef shapeB, const std::optional<at::Tensor>& bias) {
  detail::check_matmul_4bit(x, B, absmax, blocksize, quant_type, shapeB, bias);
  return at::empty_symint(linear_output_shape(x, shapeB[0]), x.options());
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora, Meta, m) {
  m.impl("quantize_4bit", &quantize_4bit_meta);
  m.impl("dequantize_4bit", &dequantize_4bit_meta);
  m.impl("dequantize_4bit.out", &dequantize_4bit_out_meta);
  m.impl("quantize_blockwise", &quantize_blockwise_meta);
  m.impl("dequantize_blockwise", &dequantize_blockwise_meta);
  m.impl("dequantize_blockwise.out", &dequantize_blockwise_out_meta);
  m.impl("gemv_4bit", &gemv_4bit_meta);
  m.impl("gemv_4bit.out", &gemv_4bit_out_meta);
  m.impl("gemm_4bit", &gemm_4bit_meta);
  m.impl("matmul_4bit", &matmul_4bit_meta);
}

}  // namespace qlora::meta
