// CUDA gemv_4bit: one warp per output feature streams that weight row's
// 4-bit codes once per input row; products and sums in float32.
#include "common/quant_math.h"
#include "cuda/device_utils.cuh"

namespace qlora::cuda {
namespace {

template <typename T>
__global__ void gemv_4bit_kernel(const T* __restrict__ A, int64_t M, int64_t N, int64_t K,
                                 const uint8_t* __restrict__ packed,
                                 const float* __restrict__ absmax, const float* __restrict__ code,
                                 int64_t blocksize, T* __restrict__ out) {
  __shared__ float table[16];
  if (threadIdx.x < 16) table[threadIdx.x] = code[threadIdx.x];
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerCta + (threadIdx.x >> 5);
  if (row >= N) return;
  const int64_t base = row * K;
  for (int64_t m = 0; m < M; ++m) {
    const T* x = A + m * K;
    float acc = 0.f;
    for (int64_t k = lane; k < K; k += 32) {
      const int64_t t = base + k;
      // Round the weight to T first: what dequantize-to-T + matmul would see.
      const float w = to_float(
          from_float<T>(table[detail::nibble_at(packed, t)] * __ldg(absmax + t / blocksize)));
      acc += to_float(x[k]) * w;
    }
    acc = warp_sum(acc);
    if (lane == 0) out[m * N + row] = from_float<T>(acc);
  }
}

}  // namespace

cudaError_t gemv_4bit(const void* A, Dtype dtype, int64_t M, int64_t N, int64_t K,
                      const uint8_t* packed, const float* absmax, const float* code,
                      int64_t blocksize, void* out, cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const unsigned grid = static_cast<unsigned>(detail::ceil_div(N, kWarpsPerCta));
    gemv_4bit_kernel<T><<<grid, kThreads, 0, stream>>>(
        static_cast<const T*>(A), M, N, K, packed, absmax, code, blocksize, static_cast<T*>(out));
    return cudaGetLastError();
  });
}

}  // namespace qlora::cuda
