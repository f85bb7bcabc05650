// CPU gemv_4bit: y = A @ dequant(B)^T for a few input rows without ever
// materialising the dequantised weight: each thread expands one weight row
// at a time into an L1/L2-resident buffer and takes its dot product, so the
// weight streams from memory at 4 bits per value.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/cpu_utils.h"
#include "cpu/dequant_range.h"
#include "cpu/isa_kernels.h"
#include "ops/checks.h"

namespace qlora::cpu {
namespace {

// Weights are rounded to T (what dequantize-to-T + matmul would use), then
// multiplied and summed in float32.
template <typename T>
void gemv_4bit_impl(const T* A, int64_t M, int64_t N, int64_t K, const uint8_t* packed,
                    const float* absmax, const detail::FourBitTables& table, int64_t blocksize,
                    T* out) {
  std::vector<float> x(M * K);
  to_float(A, M * K, x.data());
  const IsaKernels& k = isa_kernels();
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(K, 1));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> w(K);
    for (int64_t n = begin; n < end; ++n) {
      dequantize_range<T, float>(packed, absmax, blocksize, table, n * K, (n + 1) * K, w.data(), k);
      for (int64_t m = 0; m < M; ++m)
        out[m * N + n] = round_to<T>(k.dot(x.data() + m * K, w.data(), K));
    }
  });
}

void gemv_4bit_into(const at::Tensor& A, const at::Tensor& B, int64_t N, int64_t K,
                    const at::Tensor& absmax, const at::Tensor& code, int64_t blocksize,
                    at::Tensor& out) {
  TORCH_CHECK(A.device().is_cpu(), "qlora::gemv_4bit (CPU kernel): A must be on CPU");
  const at::Tensor a = A.contiguous();
  const at::Tensor bytes = B.contiguous().view(at::kByte);
  const at::Tensor scales = absmax.contiguous();
  detail::FourBitTables table{};  // only the values are used to decode
  std::memcpy(table.values, code.contiguous().const_data_ptr<float>(), sizeof(table.values));
  if (K == 0) {
    out.zero_();
    return;
  }
  dispatch_float_types(a.scalar_type(), "gemv_4bit", [&](auto tag) {
    using scalar_t = decltype(tag);
    gemv_4bit_impl<scalar_t>(a.const_data_ptr<scalar_t>(), a.numel() / K, N, K,
                             bytes.const_data_ptr<uint8_t>(), scales.const_data_ptr<float>(), table,
                             blocksize, out.mutable_data_ptr<scalar_t>());
  });
}

at::Tensor gemv_4bit_cpu(const at::Tensor& A, const at::Tensor& B, c10::SymIntArrayRef shapeB,
                         const at::Tensor& absmax, const at::Tensor& code, int64_t blocksize) {
  detail::check_gemv_4bit(A, B, shapeB, absmax, code, blocksize);
  const int64_t N = shapeB[0].expect_int();
  const int64_t K = shapeB[1].expect_int();
  std::vector<int64_t> out_shape(A.sizes().begin(), A.sizes().end() - 1);
  out_shape.push_back(N);
  at::Tensor out = at::empty(out_shape, A.options());
  gemv_4bit_into(A, B, N, K, absmax, code, blocksize, out);
  return out;
}

void gemv_4bit_out_cpu(const at::Tensor& A, const at::Tensor& B, c10::SymIntArrayRef shapeB,
                       const at::Tensor& absmax, const at::Tensor& code, int64_t blocksize,
                       at::Tensor& out) {
  detail::check_gemv_4bit_out(A, B, shapeB, absmax, code, blocksize, out);
  gemv_4bit_into(A, B, shapeB[0].expect_int(), shapeB[1].expect_int(), absmax, code, blocksize,
                 out);
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora, CPU, m) {
  m.impl("gemv_4bit", &gemv_4bit_cpu);
  m.impl("gemv_4bit.out", &gemv_4bit_out_cpu);
}

}  // namespace qlora::cpu
