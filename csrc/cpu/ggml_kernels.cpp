// CPU kernels of ggml_dequantize and ggml_matmul (ops/ggml_schemas.cpp).
// Decoding goes through the level's ggml_expand (isa_kernels.h). The
// matmul expands a chunk of output features at a time into a reused
// per-thread buffer (a whole layer at once up to 4 M weights), rounded to
// x's dtype, and runs one GEMM per chunk: matmul_4bit's numerics and memory
// bound, so a dense copy of a large weight never exists.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/linear.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu/cpu_utils.h"
#include "cpu/isa_kernels.h"
#include "cpu/onednn_linear.h"
#include "ops/dense_linear.h"
#include "ops/ggml_checks.h"
#include "qlora/ops.h"

namespace qlora::cpu {
namespace {

constexpr int64_t kMaxExpandedWeights = int64_t{1} << 22;

Expand expand_kind_for(at::ScalarType dtype, bool as_f32) {
  switch (dtype) {
    case at::kBFloat16:
      return as_f32 ? Expand::kBF16AsF32 : Expand::kBF16;
    case at::kHalf:
      return as_f32 ? Expand::kF16AsF32 : Expand::kF16;
    default:
      return Expand::kF32;
  }
}

// Decodes whole rows [r0, r1) of an [N, K] weight into dst (row r0 first),
// in parallel over blocks.
void expand_rows(const detail::GgmlBlockLayout& layout, const uint8_t* src, int64_t K, int64_t r0,
                 int64_t r1, Expand kind, uint8_t* dst) {
  const IsaKernels& k = isa_kernels();
  const int64_t per_row = K / layout.block_size;
  const int64_t first = r0 * per_row, blocks = (r1 - r0) * per_row;
  const int64_t out_bytes = expand_bytes(kind) * layout.block_size;
  at::parallel_for(0, blocks, grain_in_blocks(layout.block_size), [&](int64_t b0, int64_t b1) {
    k.ggml_expand(layout.code, src + (first + b0) * layout.type_size, b1 - b0, layout.block_size,
                  layout.type_size, kind, dst + b0 * out_bytes);
  });
}

at::Tensor ggml_dequantize_cpu(const at::Tensor& blocks, std::string_view ggml_type,
                               c10::SymIntArrayRef shape, at::ScalarType dtype) {
  const auto& layout = detail::check_ggml_dequantize(blocks, ggml_type, shape, dtype);
  const int64_t N = shape[0].expect_int(), K = shape[1].expect_int();
  at::Tensor out = at::empty({N, K}, blocks.options().dtype(dtype));
  if (out.numel() == 0) return out;
  const at::Tensor bytes = blocks.contiguous();
  expand_rows(layout, bytes.const_data_ptr<uint8_t>(), K, 0, N, expand_kind_for(dtype, false),
              static_cast<uint8_t*>(out.data_ptr()));
  return out;
}

at::Tensor ggml_matmul_cpu(const at::Tensor& x, const at::Tensor& blocks,
                           std::string_view ggml_type, c10::SymIntArrayRef shape,
                           const std::optional<at::Tensor>& bias) {
  const auto& layout = detail::check_ggml_matmul(x, blocks, ggml_type, shape, bias);
  const int64_t N = shape[0].expect_int(), K = shape[1].expect_int();
  const bool has_bias = bias.has_value() && bias->defined();
  if (x.scalar_type() == at::kDouble || x.numel() == 0 || N == 0 || K == 0) {
    // gradcheck's float64 (exact: float32 weights widen exactly) and empty inputs.
    const auto w_dtype = x.scalar_type() == at::kDouble ? at::kFloat : x.scalar_type();
    return at::linear(x, ggml_dequantize_cpu(blocks, ggml_type, shape, w_dtype).to(x.scalar_type()),
                      bias);
  }
  const at::Tensor bytes = blocks.contiguous();
  const uint8_t* src = bytes.const_data_ptr<uint8_t>();
  // bfloat16 x multiplies bfloat16 weights in oneDNN where the CPU has
  // AVX512-BF16; everything else is a float32 GEMM of weights rounded to x's dtype.
  const bool native_bf16 = x.scalar_type() == at::kBFloat16 && native_bf16_gemm();
  const Expand kind = expand_kind_for(x.scalar_type(), !native_bf16);
  const auto w_dtype = native_bf16 ? at::kBFloat16 : at::kFloat;
  const at::Tensor x2d = native_bf16 ? x.reshape({-1, K}).contiguous()
                                     : x.reshape({-1, K}).to(at::kFloat).contiguous();
  const int64_t rows = std::min(N, std::max<int64_t>(8, kMaxExpandedWeights / K));
  uint8_t* w = thread_buffer<uint8_t>(rows * K * expand_bytes(kind));
  at::Tensor out;
  for (int64_t r0 = 0; r0 < N; r0 += rows) {
    const int64_t r1 = std::min(N, r0 + rows);
    expand_rows(layout, src, K, r0, r1, kind, w);
    const at::Tensor wc = at::from_blob(w, {r1 - r0, K}, at::TensorOptions(w_dtype));
    at::Tensor y = detail::dense_linear(x2d, wc);
    if (r1 - r0 == N) {
      out = y;
      break;
    }
    if (!out.defined()) out = at::empty({x2d.size(0), N}, y.options());
    out.narrow(1, r0, r1 - r0).copy_(y);
  }
  if (has_bias) out = out.to(at::kFloat).add_(bias->to(at::kFloat));
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end() - 1);
  out_shape.push_back(N);
  return out.to(x.scalar_type()).view(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora, CPU, m) {
  m.impl("ggml_dequantize", &ggml_dequantize_cpu);
  m.impl("ggml_matmul", &ggml_matmul_cpu);
}

}  // namespace qlora::cpu
