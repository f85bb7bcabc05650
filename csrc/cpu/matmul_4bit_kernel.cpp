// CPU matmul_4bit. Several input rows: the weight is expanded a chunk of
// output features at a time into a per-thread float32 buffer that stays in
// cache, and each chunk is one float32 GEMM; the dense weight never exists
// in memory (no 100+ MB allocation, no page faults). Weights are rounded to
// the input dtype first, so results are those of dequantize-to-dtype + GEMM
// with float32 accumulation, rounded once at the end.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mm_native.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../common/tables.h"
#include "../ops/checks.h"
#include "../ops/matmul_4bit_composite.h"
#include "cpu_utils.h"
#include "dequant_range.h"
#include "qlora/ops.h"

namespace qlora::cpu {
namespace {

// About 2 MB of float32 weights per chunk: large enough for an efficient
// GEMM, small enough to stay in L2.
int64_t rows_per_chunk(int64_t K) {
  return std::max<int64_t>(8, (int64_t{1} << 19) / std::max<int64_t>(K, 1));
}

// Chunks run one after the other: the expansion of a chunk and its GEMM are
// each parallel on their own (a GEMM inside at::parallel_for would nest
// thread pools and oversubscribe the cores).
template <typename T>
void chunked_matmul(const at::Tensor& x2d, const uint8_t* packed, const float* absmax,
                    int64_t blocksize, const detail::FourBitTables& t, int64_t N, int64_t K,
                    at::Tensor& out_f32) {
  const int64_t rows = std::min(N, rows_per_chunk(K));
  const bool avx2 = simd::avx2_enabled();
  std::vector<float> w(rows * K);
  for (int64_t r0 = 0; r0 < N; r0 += rows) {
    const int64_t r1 = std::min(N, r0 + rows);
    at::parallel_for(r0, r1, 1, [&](int64_t begin, int64_t end) {
      dequantize_range<T, float>(packed, absmax, blocksize, t, begin * K, end * K,
                                 w.data() + (begin - r0) * K, avx2);
    });
    const at::Tensor wc = at::from_blob(w.data(), {r1 - r0, K}, at::TensorOptions(at::kFloat));
    at::Tensor dst = out_f32.narrow(1, r0, r1 - r0);
    at::mm_out(dst, x2d, wc.t());
  }
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
  const at::Tensor x2d = x.reshape({-1, K}).to(at::kFloat).contiguous();
  const at::Tensor bytes = B.contiguous().view(at::kByte);
  const at::Tensor scales = absmax.contiguous();
  at::Tensor out = at::empty({x2d.size(0), N}, x2d.options());
  dispatch_float_types(x.scalar_type(), "matmul_4bit", [&](auto tag) {
    chunked_matmul<decltype(tag)>(x2d, bytes.const_data_ptr<uint8_t>(),
                                  scales.const_data_ptr<float>(), blocksize, tables, N, K, out);
  });
  if (bias.has_value() && bias->defined()) out.add_(bias->to(at::kFloat));
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
  shape.push_back(N);
  return out.to(x.scalar_type()).view(shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora, CPU, m) { m.impl("matmul_4bit", &matmul_4bit_cpu); }

}  // namespace qlora::cpu
