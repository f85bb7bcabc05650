// Argument validation shared by the CPU, CUDA and Meta kernels, so every
// backend rejects bad input with the same message naming the op, the
// argument and what was expected.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/SymInt.h>
#include <c10/util/ArrayRef.h>

#include <string_view>

#include "common/quant_math.h"

namespace qlora::detail {

QuantType parse_quant_type(std::string_view op, std::string_view quant_type);
void check_blocksize(std::string_view op, int64_t blocksize);
void check_float_dtype(std::string_view op, std::string_view what, at::ScalarType dtype);
void check_same_device(std::string_view op, const at::Tensor& a, std::string_view a_name,
                       const at::Tensor& b, std::string_view b_name);
c10::SymInt checked_numel(std::string_view op, c10::SymIntArrayRef shape);

// Sizes of the 4-bit packed representation of `n` elements.
c10::SymInt packed_bytes(const c10::SymInt& n);
c10::SymInt num_blocks(const c10::SymInt& n, int64_t blocksize);

// quantize_4bit(A, blocksize, quant_type, quant_storage)
void check_quantize_4bit(const at::Tensor& A, int64_t blocksize, std::string_view quant_type,
                         at::ScalarType quant_storage);
// dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype); returns numel(shape)
c10::SymInt check_dequantize_4bit(const at::Tensor& A, const at::Tensor& absmax, int64_t blocksize,
                                  std::string_view quant_type, c10::SymIntArrayRef shape,
                                  at::ScalarType dtype);
// dequantize_4bit.out: the above plus out's shape, dtype, device, layout.
c10::SymInt check_dequantize_4bit_out(const at::Tensor& A, const at::Tensor& absmax,
                                      int64_t blocksize, std::string_view quant_type,
                                      c10::SymIntArrayRef shape, at::ScalarType dtype,
                                      const at::Tensor& out);
void check_quantize_blockwise(const at::Tensor& A, const at::Tensor& code, int64_t blocksize);
void check_dequantize_blockwise(const at::Tensor& A, const at::Tensor& absmax,
                                const at::Tensor& code, int64_t blocksize, at::ScalarType dtype);
void check_gemv_4bit(const at::Tensor& A, const at::Tensor& B, c10::SymIntArrayRef shapeB,
                     const at::Tensor& absmax, const at::Tensor& code, int64_t blocksize);
void check_gemv_4bit_out(const at::Tensor& A, const at::Tensor& B, c10::SymIntArrayRef shapeB,
                         const at::Tensor& absmax, const at::Tensor& code, int64_t blocksize,
                         const at::Tensor& out);
void check_dequantize_blockwise_out(const at::Tensor& A, const at::Tensor& absmax,
                                    const at::Tensor& code, int64_t blocksize, at::ScalarType dtype,
                                    const at::Tensor& out);
// gemm_4bit(A, B, shapeB, absmax, blocksize, quant_type, bias?, absmax_8bit?,
// absmax_code?, absmax_offset?): with absmax_8bit the statistics are double
// quantised (absmax then holds the nested absmax, one per 256 blocks).
void check_gemm_4bit(const at::Tensor& A, const at::Tensor& B, c10::SymIntArrayRef shapeB,
                     const at::Tensor& absmax, int64_t blocksize, std::string_view quant_type,
                     const std::optional<at::Tensor>& bias,
                     const std::optional<at::Tensor>& absmax_8bit,
                     const std::optional<at::Tensor>& absmax_code,
                     const std::optional<at::Tensor>& absmax_offset);
void check_matmul_4bit(const at::Tensor& x, const at::Tensor& B, const at::Tensor& absmax,
                       int64_t blocksize, std::string_view quant_type, c10::SymIntArrayRef shapeB,
                       const std::optional<at::Tensor>& bias);

void check_hash_dropout(const at::Tensor& input, double p);

// Error raised by the CPU/CUDA quantizers when a block holds inf or NaN.
[[noreturn]] void fail_non_finite(std::string_view op, int64_t block, int64_t blocksize);

}  // namespace qlora::detail
