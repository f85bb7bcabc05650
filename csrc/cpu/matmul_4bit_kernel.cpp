// CPU matmul_4bit. Several input rows: the weight is expanded into a
// reused per-thread buffer, a whole layer at once up to 4 M weights (one GEMM
// straight into the output), else a chunk of output features at a time, so a
// dense copy of a large weight never exists in memory. Weights are rounded to
// the input dtype first, so results are those of dequantize-to-dtype + GEMM
// with float32 accumulation, rounded once at the end. The GEMMs go through
// oneDNN where it is available (onednn_linear.h): bfloat16 inputs then
// multiply bfloat16 weights directly, everything else computes in float32.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "cpu/cpu_utils.h"
#include "cpu/dequant_range.h"
#include "cpu/onednn_linear.h"
#include "ops/checks.h"
#include "ops/code_tables.h"
#include "ops/dense_linear.h"
#include "ops/matmul_4bit_composite.h"
#include "qlora/ops.h"

namespace qlora::cpu {
namespace {

constexpr int64_t kMaxExpandedWeights = int64_t{1} << 22;

int64_t rows_per_chunk(int64_t K) {
  return std::max<int64_t>(8, kMaxExpandedWeights / std::max<int64_t>(K, 1));
}

// Chunks run one after the other: the expansion of a chunk and its GEMM are
// each parallel on their own (a GEMM inside at::parallel_for would nest
// thread pools and oversubscribe the cores). T is the input dtype (the
// rounding of the weights), W the element type the GEMM reads.
template <typename T, typename W>
at::Tensor chunked_matmul(const at::Tensor& x2d, const uint8_t* packed, const float* absmax,
                          int64_t blocksize, const detail::FourBitTables& t, int64_t N, int64_t K) {
  const int64_t rows = std::min(N, rows_per_chunk(K));
  const IsaKernels& k = isa_kernels();
  const auto w_dtype = std::is_same_v<W, float> ? at::kFloat : at::kBFloat16;
  W* w = thread_buffer<W>(rows * K);
  at::Tensor out;
  for (int64_t r0 = 0; r0 < N; r0 += rows) {
    const int64_t r1 = std::min(N, r0 + rows);
    at::parallel_for(r0, r1, 1, [&](int64_t begin, int64_t end) {
      dequantize_range<T, W>(packed, absmax, blocksize, t, begin * K, end * K, w + (begin - r0) * K,
                             k);
    });
    const at::Tensor wc = at::from_blob(w, {r1 - r0, K}, at::TensorOptions(w_dtype));
    at::Tensor y = detail::dense_linear(x2d, wc);
    if (r1 - r0 == N) return y;
    if (!out.defined()) out = at::empty({x2d.size(0), N}, y.options());
    out.narrow(1, r0, r1 - r0).copy_(y);
  }
  return out;
}

at::Tensor matmul_4bit_cpu(const at::Tensor& x, const at::Tensor& B, const at::Tensor& absmax,
                           int64_t blocksize, std::string_view quant_type,
                           c10::SymIntArrayRef shapeB, const std::optional<at::Tensor>& bias) {
  const bool single_row = x.numel() > 0 && x.numel() == x.size(-1);
  if (x.scalar_type() == at::kDouble || single_row || x.numel() == 0)
    return detail::matmul_4bit_composite(x, B, absmax, blocksize, quant_type, shapeB, bias);
  detail::check_matmul_4bit(x, B, absmax, blocksize, quant_type, shapeB, bias);
  const int64_t N = shapeB[0].expect_int(), K = shapeB[1].expect_int();
  const auto& tables = detail::host_tables(detail::parse_quant_type("matmul_4bit", quant_type));
  const at::Tensor bytes = B.contiguous().view(at::kByte);
  const at::Tensor scales = absmax.contiguous();
  const bool has_bias = bias.has_value() && bias->defined();
  if (x.scalar_type() == at::kBFloat16 && native_bf16_gemm()) {
    // bfloat16 weights straight into oneDNN's bfloat16 GEMM (products are
    // exact in its float32 accumulator); a bias is added to the rounded
    // result, one more rounding.
    const at::Tensor x2d = x.reshape({-1, K}).contiguous();
    at::Tensor out = chunked_matmul<c10::BFloat16, c10::BFloat16>(
        x2d, bytes.const_data_ptr<uint8_t>(), scales.const_data_ptr<float>(), blocksize, tables, N,
        K);
    if (has_bias) out = out.to(at::kFloat).add_(bias->to(at::kFloat)).to(at::kBFloat16);
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
    shape.push_back(N);
    return out.view(shape);
  }
  const at::Tensor x2d = x.reshape({-1, K}).to(at::kFloat).contiguous();
  at::Tensor out;
  dispatch_float_types(x.scalar_type(), "matmul_4bit", [&](auto tag) {
    out = chunked_matmul<decltype(tag), float>(x2d, bytes.const_data_ptr<uint8_t>(),
                                               scales.const_data_ptr<float>(), blocksize, tables, N,
                                               K);
  });
  if (has_bias) out.add_(bias->to(at::kFloat));
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
  shape.push_back(N);
  return out.to(x.scalar_type()).view(shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora, CPU, m) { m.impl("matmul_4bit", &matmul_4bit_cpu); }

}  // namespace qlora::cpu
