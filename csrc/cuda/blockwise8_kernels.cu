// CUDA kernels of the 8-bit blockwise quantizer: one warp per block, exact
// nearest code by float32 midpoints (the rule the CPU kernel uses).
#include "common/quant_math.h"
#include "cuda/device_utils.cuh"

namespace qlora::cuda {
namespace {

template <typename T>
__global__ void quantize_blockwise_kernel(const T* __restrict__ in, int64_t n, int64_t blocksize,
                                          const float* __restrict__ code, uint8_t* __restrict__ out,
                                          float* __restrict__ absmax,
                                          unsigned long long* bad_block) {
  __shared__ float bounds[255];
  for (int i = threadIdx.x; i < 255; i += blockDim.x) bounds[i] = (code[i] + code[i + 1]) / 2.0f;
  __syncthreads();

  const int lane = threadIdx.x & 31;
  const int64_t block = static_cast<int64_t>(blockIdx.x) * kWarpsPerCta + (threadIdx.x >> 5);
  const int64_t start = block * blocksize;
  if (start >= n) return;
  const int64_t len = min(blocksize, n - start);

  uint32_t bits = 0;
  for (int64_t i = lane; i < len; i += 32)
    bits = max(bits, detail::abs_bits(to_float(in[start + i])));
  bits = warp_max_u32(bits);
  if (bits >= detail::kNonFiniteBits) {
    if (lane == 0) atomicMin(bad_block, static_cast<unsigned long long>(block));
    return;
  }
  const float amax = detail::bits_float(bits);
  const bool partial = len < blocksize;
  if (lane == 0) absmax[block] = partial ? fmaxf(amax, detail::kMinAbsmax) : amax;
  const float inv = detail::reciprocal_scale(amax);
  for (int64_t i = lane; i < len; i += 32) {
    const float x = to_float(in[start + i]);
    const float v = partial ? detail::normalise_partial(x, amax) : detail::normalise_full(x, inv);
    out[start + i] = detail::encode_8bit(v, bounds);
  }
}

template <typename T>
__global__ void dequantize_blockwise_kernel(const uint8_t* __restrict__ in,
                                            const float* __restrict__ absmax,
                                            const float* __restrict__ code, int64_t n,
                                            int64_t blocksize, T* __restrict__ out) {
  __shared__ float table[256];
  for (int i = threadIdx.x; i < 256; i += blockDim.x) table[i] = code[i];
  __syncthreads();
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = from_float<T>(table[in[i]] * __ldg(absmax + i / blocksize));
}

}  // namespace

cudaError_t quantize_blockwise(const void* in, Dtype dtype, int64_t n, int64_t blocksize,
                               const float* code, uint8_t* out, float* absmax,
                               unsigned long long* bad_block, cudaStream_t stream) {
  const int64_t blocks = detail::ceil_div(n, blocksize);
  if (blocks == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const unsigned grid = static_cast<unsigned>(detail::ceil_div(blocks, kWarpsPerCta));
    quantize_blockwise_kernel<T><<<grid, kThreads, 0, stream>>>(
        static_cast<const T*>(in), n, blocksize, code, out, absmax, bad_block);
    return cudaGetLastError();
  });
}

cudaError_t dequantize_blockwise(const uint8_t* in, const float* absmax, const float* code,
                                 int64_t n, int64_t blocksize, void* out, Dtype dtype,
                                 cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    dequantize_blockwise_kernel<T><<<grid_for(n), kThreads, 0, stream>>>(
        in, absmax, code, n, blocksize, static_cast<T*>(out));
    return cudaGetLastError();
  });
}

}  // namespace qlora::cuda
