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
#include "ops/checks.h"
#include "ops/ggml_checks.h"
#include "ops/matmul_4bit_composite.h"

namespace qlora::cuda {
namespace {

Dtype to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return Dtype::kFloat32;
    case at::kHalf:
      return Dtype::kFloat16;
    case at::kBFloat16:
      return Dtype::kBFloat16;
    default:
      TORCH_CHECK(false, "qlora CUDA kernels: unsupported dtype ", t);
  }
}

void require_cuda(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "qlora::", op, " (CUDA kernel): ", name, " must be a CUDA tensor, got ",
              t.device());
}

// Lowest bad block, or INT64_MAX; the device flag is read back once (a sync)
// so a non-finite input is an error, not silent garbage codes.
at::Tensor new_bad_block_flag(const at::Tensor& like) {
  return at::full({1}, std::numeric_limits<int64_t>::max(), like.options().dtype(at::kLong));
}
void raise_if_bad(const char* op, const at::Tensor& flag, int64_t blocksize) {
  const int64_t bad = flag.item<int64_t>();
  if (bad != std::numeric_limits<int64_t>::max()) detail::fail_non_finite(op, bad, blocksize);
}
unsigned long long* flag_ptr(at::Tensor& flag) {
  return reinterpret_cast<unsigned long long*>(flag.mutable_data_ptr<int64_t>());
}

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

at::Tensor dequantize_blockwise_cuda(const at::Tensor& A, const at::Tensor& absmax,
                                     const at::Tensor& code, int64_t blocksize,
                                     at::ScalarType dtype) {
  detail::check_dequantize_blockwise(A, absmax, code, blocksize, dtype);
  require_cuda("dequantize_blockwise", A, "A");
  const c10::cuda::CUDAGuard guard(A.device());
  const at::Tensor q = A.contiguous();
  const at::Tensor scales = absmax.contiguous();
  const at::Tensor table = code.contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options().dtype(dtype));
  C10_CUDA_CHECK(dequantize_blockwise(q.const_data_ptr<uint8_t>(), scales.const_data_ptr<float>(),
                                      table.const_data_ptr<float>(), q.numel(), blocksize,
                                      out.mutable_data_ptr(), to_dtype(dtype),
                                      at::cuda::getCurrentCUDAStream()));
  return out;
}

at::Tensor gemv_4bit_cuda(const at::Tensor& A, const at::Tensor& B, c10::SymIntArrayRef shapeB,
                          const at::Tensor& absmax, const at::Tensor& code, int64_t blocksize) {
  detail::check_gemv_4bit(A, B, shapeB, absmax, code, blocksize);
  require_cuda("gemv_4bit", A, "A");
  const c10::cuda::CUDAGuard guard(A.device());
  const int64_t N = shapeB[0].expect_int();
  const int64_t K = shapeB[1].expect_int();
  const at::Tensor a = A.contiguous();
  const at::Tensor bytes = B.contiguous().view(at::kByte);
  const at::Tensor scales = absmax.contiguous();
  const at::Tensor table = code.contiguous();
  std::vector<int64_t> out_shape(a.sizes().begin(), a.sizes().end() - 1);
  out_shape.push_back(N);
  at::Tensor out = at::empty(out_shape, a.options());
  const int64_t M = K == 0 ? 0 : a.numel() / K;
  if (K == 0) return out.zero_();
  C10_CUDA_CHECK(gemv_4bit(a.const_data_ptr(), to_dtype(a.scalar_type()), M, N, K,
                           bytes.const_data_ptr<uint8_t>(), scales.const_data_ptr<float>(),
                           table.const_data_ptr<float>(), blocksize, out.mutable_data_ptr(),
                           at::cuda::getCurrentCUDAStream()));
  return out;
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
  m.impl("gemv_4bit", &gemv_4bit_cuda);
  // Dequantize into the input dtype + cuBLAS, or the fused gemv for one row.
  m.impl("matmul_4bit", &detail::matmul_4bit_composite);
  m.impl("hash_dropout", &hash_dropout_cuda);
}

}  // namespace qlora::cuda
