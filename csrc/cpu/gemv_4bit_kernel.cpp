// CPU gemv_4bit: y = A @ dequant(B)^T for a few input rows without ever
// materialising the dequantised weight, so it streams 4 bits per weight
// instead of 16/32. Output rows run in parallel.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../common/quant_math.h"
#include "../ops/checks.h"
#include "cpu_utils.h"

namespace qlora::cpu {
namespace {

// Dot product of x (K floats) with weight row `row` of a [N, K] 4-bit
// matrix whose blocks run over the flattened tensor (so a block may straddle
// rows when K is not a multiple of the blocksize). Each weight is rounded to
// T first, as dequantize-to-T followed by a matmul would see it.
template <typename T>
float dot_row(const float* x, const uint8_t* packed, const float* absmax, const float* code,
              int64_t row, int64_t K, int64_t blocksize) {
  const int64_t row_begin = row * K;
  const int64_t row_end = row_begin + K;
  float acc0 = 0.f, acc1 = 0.f;
  float lut[16];
  for (int64_t t = row_begin; t < row_end;) {
    const int64_t block = t / blocksize;
    const int64_t seg_end = std::min(row_end, (block + 1) * blocksize);
    for (int k = 0; k < 16; ++k) lut[k] = static_cast<float>(round_to<T>(code[k] * absmax[block]));
    const float* xs = x + (t - row_begin);
    int64_t i = t;
    if (i & 1) {  // odd start: finish the byte shared with the previous segment
      acc0 += *xs++ * lut[detail::nibble_at(packed, i)];
      ++i;
    }
    for (; i + 1 < seg_end; i += 2, xs += 2) {
      const uint8_t byte = packed[i >> 1];
      acc0 += xs[0] * lut[byte >> 4];
      acc1 += xs[1] * lut[byte & 0x0F];
    }
    if (i < seg_end) acc0 += *xs * lut[detail::nibble_at(packed, i)];
    t = seg_end;
  }
  return acc0 + acc1;
}

template <typename T>
void gemv_4bit_impl(const T* A, int64_t M, int64_t N, int64_t K, const uint8_t* packed,
                    const float* absmax, const float* code, int64_t blocksize, T* out) {
  std::vector<float> x(K);
  // A few rows at most: each row is one parallel sweep over the weight.
  for (int64_t m = 0; m < M; ++m) {
    to_float(A + m * K, K, x.data());
    const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(K, 1));
    at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n)
        out[m * N + n] =
            round_to<T>(dot_row<T>(x.data(), packed, absmax, code, n, K, blocksize));
    });
  }
}

at::Tensor gemv_4bit_cpu(const at::Tensor& A, const at::Tensor& B, c10::SymIntArrayRef shapeB,
                         const at::Tensor& absmax, const at::Tensor& code, int64_t blocksize) {
  detail::check_gemv_4bit(A, B, shapeB, absmax, code, blocksize);
  TORCH_CHECK(A.device().is_cpu(), "qlora::gemv_4bit (CPU kernel): A must be on CPU");
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "gemv_4bit", [&] {
    if (K == 0) {
      out.zero_();
      return;
    }
    gemv_4bit_impl<scalar_t>(a.const_data_ptr<scalar_t>(), M, N, K, bytes.const_data_ptr<uint8_t>(),
                             scales.const_data_ptr<float>(), table.const_data_ptr<float>(),
                             blocksize, out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora, CPU, m) { m.impl("gemv_4bit", &gemv_4bit_cpu); }

}  // namespace qlora::cpu
