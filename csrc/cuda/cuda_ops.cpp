// CUDA dispatch-key kernels: validate, allocate on the input's device, and
// launch on the current stream through the ATen-free launchers.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/linear.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "cuda/launchers.h"
#include "cuda/op_utils.h"
#include "ops/checks.h"
#include "ops/ggml_checks.h"
#include "ops/matmul_4bit_composite.h"

namespace qlora::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> quantize_4bit_cuda(const at::Tensor& A, int64_t blocksize,
                                                      std::string_view quant_type,
                                                      at::ScalarType quant_storage) {
  detail::check_quantize_4bit(A, blocksize, quant_type, quant_storage);
  require_cuda("quantize_4bit", A, "A");
  const c10::cuda::CUDAGuard guard(A.device());
  const int type = static_cast<int>(detail::parse_quant_type("quantize_4bit", quant_type));
  const at::Tensor input = A.contiguous();
  const int64_t n = input.numel();
  const int64_t nbytes = (n + 1) / 2;
  at::Tensor packed = at::empty({nbytes, 1}, input.options().dtype(at::kByte));
  at::Tensor absmax =
      at::empty({detail::ceil_div(n, blocksize)}, input.options().dtype(at::kFloat));
  at::Tensor bad = new_bad_block_flag(input);
  C10_CUDA_CHECK(quantize_4bit(input.const_data_ptr(), to_dtype(input.scalar_type()), n, blocksize,
                               type, packed.mutable_data_ptr<uint8_t>(),
                               absmax.mutable_data_ptr<float>(), flag_ptr(bad),
                               at::cuda::getCurrentCUDAStream()));
  raise_if_bad("quantize_4bit", bad, blocksize);
  if (quant_storage != at::kByte) {
    const int64_t esize = static_cast<int64_t>(c10::elementSize(quant_storage));
    packed = packed.view({nbytes}).view(quant_storage).view({nbytes / esize, 1});
  }
  return {packed, absmax};
}

void dequantize_4bit_into(const at::Tensor& A, const at::Tensor& absmax, int64_t blocksize,
                          std::string_view quant_type, int64_t n, at::Tensor& out) {
  require_cuda("dequantize_4bit", A, "A");
  const c10::cuda::CUDAGuard guard(A.device());
  const int type = static_cast<int>(detail::parse_quant_type("dequantize_4bit", quant_type));
  const at::Tensor bytes = A.contiguous().view(at::kByte);
  const at::Tensor scales = absmax.contiguous();
  C10_CUDA_CHECK(dequantize_4bit(bytes.const_data_ptr<uint8_t>(), scales.const_data_ptr<float>(), n,
                                 blocksize, type, out.mutable_data_ptr(),
                                 to_dtype(out.scalar_type()), at::cuda::getCurrentCUDAStream()));
}

at::Tensor dequantize_4bit_cuda(const at::Tensor& A, const at::Tensor& absmax, int64_t blocksize,
                                std::string_view quant_type, c10::SymIntArrayRef shape,
                                at::ScalarType dtype) {
  const int64_t n =
      detail::check_dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype).expect_int();
  at::Tensor out = at::empty(C10_AS_INTARRAYREF_SLOW(shape), A.options().dtype(dtype));
  dequantize_4bit_into(A, absmax, blocksize, quant_type, n, out);
  return out;
}

void dequantize_4bit_out_cuda(const at::Tensor& A, const at::Tensor& absmax, int64_t blocksize,
                              std::string_view quant_type, c10::SymIntArrayRef shape,
                              at::ScalarType dtype, at::Tensor& out) {
  const int64_t n =
      detail::check_dequantize_4bit_out(A, absmax, blocksize, quant_type, shape, dtype, out)
          .expect_int();
  dequantize_4bit_into(A, absmax, blocksize, quant_type, n, out);
}

std::tuple<at::Tensor, at::Tensor> quantize_blockwise_cuda(const at::Tensor& A,
                                                           const at::Tensor& code,
                                                           int64_t blocksize) {
  detail::check_quantize_blockwise(A, code, blocksize);
  require_cuda("quantize_blockwise", A, "A");
  const c10::cuda::CUDAGuard guard(A.device());
  const at::Tensor input = A.contiguous();
  const at::Tensor table = code.contiguous();
  const int64_t n = input.numel();
  at::Tensor out = at::empty(input.sizes(), input.options().dtype(at::kByte));
  at::Tensor absmax =
      at::empty({detail::ceil_div(n, blocksize)}, input.options().dtype(at::kFloat));
  at::Tensor bad = new_bad_block_flag(input);
  C10_CUDA_CHECK(quantize_blockwise(
      input.const_data_ptr(), to_dtype(input.scalar_type()), n, blocksize,
      table.const_data_ptr<float>(), out.mutable_data_ptr<uint8_t>(),
      absmax.mutable_data_ptr<float>(), flag_ptr(bad), at::cuda::getCurrentCUDAStream()));
  raise_if_bad("quantize_blockwise", bad, blocksize);
  return {out, absmax};
}

void dequantize_blockwise_into(const at::Tensor& A, const at::Tensor& absmax,
                               const at::Tensor& code, int64_t blocksize, at::Tensor& out) {
  require_cuda("dequantize_blockwise", A, "A");
  const c10::cuda::CUDAGuard guard(A.device());
  const at::Tensor q = A.contiguous();
  const at::Tensor scales = absmax.contiguous();
  const at::Tensor table = code.contiguous();
  C10_CUDA_CHECK(dequantize_blockwise(q.const_data_ptr<uint8_t>(), scales.const_data_ptr<float>(),
                                      table.const_data_ptr<float>(), q.numel(), blocksize,
                                      out.mutable_data_ptr(), to_dtype(out.scalar_type()),
                                      at::cuda::getCurrentCUDAStream()));
}

at::Tensor dequantize_blockwise_cuda(const at::Tensor& A, const at::Tensor& absmax,
                                     const at::Tensor& code, int64_t blocksize,
                                     at::ScalarType dtype) {
  detail::check_dequantize_blockwise(A, absmax, code, blocksize, dtype);
  at::Tensor out = at::empty(A.sizes(), A.options().dtype(dtype));
  dequantize_blockwise_into(A, absmax, code, blocksize, out);
  return out;
}

void dequantize_blockwise_out_cuda(const at::Tensor& A, const at::Tensor& absmax,
                                   const at::Tensor& code, int64_t blocksize, at::ScalarType dtype,
                                   at::Tensor& out) {
  detail::check_dequantize_blockwise_out(A, absmax, code, blocksize, dtype, out);
  dequantize_blockwise_into(A, absmax, code, blocksize, out);
}

void gemv_4bit_into(const at::Tensor& A, const at::Tensor& B, int64_t N, int64_t K,
                    const at::Tensor& absmax, const at::Tensor& code, int64_t blocksize,
                    at::Tensor& out) {
  require_cuda("gemv_4bit", A, "A");
  const c10::cuda::CUDAGuard guard(A.device());
  const at::Tensor a = A.contiguous();
  const at::Tensor bytes = B.contiguous().view(at::kByte);
  const at::Tensor scales = absmax.contiguous();
  const at::Tensor table = code.contiguous();
  if (K == 0) {
    out.zero_();
    return;
  }
  C10_CUDA_CHECK(gemv_4bit(a.const_data_ptr(), to_dtype(a.scalar_type()), a.numel() / K, N, K,
                           bytes.const_data_ptr<uint8_t>(), scales.const_data_ptr<float>(),
                           table.const_data_ptr<float>(), blocksize, out.mutable_data_ptr(),
                           at::cuda::getCurrentCUDAStream()));
}

at::Tensor gemv_4bit_cuda(const at::Tensor& A, const at::Tensor& B, c10::SymIntArrayRef shapeB,
                          const at::Tensor& absmax, const at::Tensor& code, int64_t blocksize) {
  detail::check_gemv_4bit(A, B, shapeB, absmax, code, blocksize);
  const int64_t N = shapeB[0].expect_int();
  std::vector<int64_t> out_shape(A.sizes().begin(), A.sizes().end() - 1);
  out_shape.push_back(N);
  at::Tensor out = at::empty(out_shape, A.options());
  gemv_4bit_into(A, B, N, shapeB[1].expect_int(), absmax, code, blocksize, out);
  return out;
}

void gemv_4bit_out_cuda(const at::Tensor& A, const at::Tensor& B, c10::SymIntArrayRef shapeB,
                        const at::Tensor& absmax, const at::Tensor& code, int64_t blocksize,
                        at::Tensor& out) {
  detail::check_gemv_4bit_out(A, B, shapeB, absmax, code, blocksize, out);
  gemv_4bit_into(A, B, shapeB[0].expect_int(), shapeB[1].expect_int(), absmax, code, blocksize,
                 out);
}

// Double-quantised statistics with more than one row: one kernel decodes
// the statistics while dequantising into A's dtype, then cuBLAS. A single
// row (or float32 statistics) takes matmul_4bit's route (the fused gemv).
at::Tensor gemm_4bit_cuda(const at::Tensor& A, const at::Tensor& B, c10::SymIntArrayRef shapeB,
                          const at::Tensor& absmax, int64_t blocksize, std::string_view quant_type,
                          const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& absmax_8bit,
                          const std::optional<at::Tensor>& absmax_code,
                          const std::optional<at::Tensor>& absmax_offset) {
  const bool nested = absmax_8bit.has_value() && absmax_8bit->defined();
  if (!nested || A.numel() == A.size(-1))
    return detail::gemm_4bit_composite(A, B, shapeB, absmax, blocksize, quant_type, bias,
                                       absmax_8bit, absmax_code, absmax_offset);
  detail::check_gemm_4bit(A, B, shapeB, absmax, blocksize, quant_type, bias, absmax_8bit,
                          absmax_code, absmax_offset);
  require_cuda("gemm_4bit", A, "A");
  const c10::cuda::CUDAGuard guard(A.device());
  const int type = static_cast<int>(detail::parse_quant_type("gemm_4bit", quant_type));
  const int64_t N = shapeB[0].expect_int(), K = shapeB[1].expect_int();
  const at::Tensor bytes = B.contiguous().view(at::kByte);
  const at::Tensor q = absmax_8bit->contiguous();
  const at::Tensor nested_absmax = absmax.contiguous();
  const at::Tensor code8 = absmax_code->contiguous();
  at::Tensor W = at::empty({N, K}, A.options());
  C10_CUDA_CHECK(dequantize_4bit_nested(
      bytes.const_data_ptr<uint8_t>(), q.const_data_ptr<uint8_t>(),
      nested_absmax.const_data_ptr<float>(), code8.const_data_ptr<float>(),
      absmax_offset->const_data_ptr<float>(), N * K, blocksize, type, W.mutable_data_ptr(),
      to_dtype(A.scalar_type()), at::cuda::getCurrentCUDAStream()));
  return at::linear(A, W, bias);
}

at::Tensor hash_dropout_cuda(const at::Tensor& input, double p, int64_t seed) {
  require_cuda("hash_dropout", input, "input");
  detail::check_hash_dropout(input, p);
  TORCH_CHECK(input.scalar_type() != at::kDouble,
              "qlora::hash_dropout (CUDA kernel): float64 is not supported; use float32, "
              "float16 or bfloat16");
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor src = input.contiguous();
  at::Tensor out = at::empty_like(src, at::MemoryFormat::Contiguous);
  C10_CUDA_CHECK(hash_dropout(src.const_data_ptr(), to_dtype(src.scalar_type()), src.numel(),
                              static_cast<uint64_t>(seed), p, out.mutable_data_ptr(),
                              at::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace

at::Tensor ggml_dequantize_cuda(const at::Tensor& blocks, std::string_view ggml_type,
                                c10::SymIntArrayRef shape, at::ScalarType dtype) {
  const auto& layout = detail::check_ggml_dequantize(blocks, ggml_type, shape, dtype);
  require_cuda("ggml_dequantize", blocks, "blocks");
  const c10::cuda::CUDAGuard guard(blocks.device());
  const at::Tensor src = blocks.contiguous();
  at::Tensor out = at::empty(C10_AS_INTARRAYREF_SLOW(shape), src.options().dtype(dtype));
  C10_CUDA_CHECK(ggml_dequantize(static_cast<int32_t>(layout.code), layout.block_size,
                                 layout.type_size, src.const_data_ptr<uint8_t>(),
                                 out.numel() / layout.block_size, out.mutable_data_ptr(),
                                 to_dtype(dtype), at::cuda::getCurrentCUDAStream()));
  return out;
}

// Dequantise into x's dtype, then cuBLAS (float64, for gradcheck, through
// float32: exact).
at::Tensor ggml_matmul_cuda(const at::Tensor& x, const at::Tensor& blocks,
                            std::string_view ggml_type, c10::SymIntArrayRef shape,
                            const std::optional<at::Tensor>& bias) {
  detail::check_ggml_matmul(x, blocks, ggml_type, shape, bias);
  const auto w_dtype = x.scalar_type() == at::kDouble ? at::kFloat : x.scalar_type();
  return at::linear(x, ggml_dequantize_cuda(blocks, ggml_type, shape, w_dtype).to(x.scalar_type()),
                    bias);
}

TORCH_LIBRARY_IMPL(qlora, CUDA, m) {
  m.impl("ggml_dequantize", &ggml_dequantize_cuda);
  m.impl("ggml_matmul", &ggml_matmul_cuda);
  m.impl("quantize_4bit", &quantize_4bit_cuda);
  m.impl("dequantize_4bit", &dequantize_4bit_cuda);
  m.impl("dequantize_4bit.out", &dequantize_4bit_out_cuda);
  m.impl("quantize_blockwise", &quantize_blockwise_cuda);
  m.impl("dequantize_blockwise", &dequantize_blockwise_cuda);
  m.impl("dequantize_blockwise.out", &dequantize_blockwise_out_cuda);
  m.impl("gemv_4bit", &gemv_4bit_cuda);
  m.impl("gemv_4bit.out", &gemv_4bit_out_cuda);
  m.impl("gemm_4bit", &gemm_4bit_cuda);
  // Dequantize into the input dtype + cuBLAS, or the fused gemv for one row.
  m.impl("matmul_4bit", &detail::matmul_4bit_composite);
  m.impl("hash_dropout", &hash_dropout_cuda);
}

}  // namespace qlora::cuda
