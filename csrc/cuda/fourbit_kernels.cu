// CUDA kernels of quantize_4bit / dequantize_4bit. One warp per quantization
// block; the per-element rules are the shared ones in common/quant_math.h.
#include "common/quant_math.h"
#include "cuda/device_utils.cuh"

namespace qlora::cuda {
namespace {

using detail::FourBitTables;

__constant__ FourBitTables c_tables[2] = {
    {{QLORA_NF4_VALUES},
     {QLORA_NF4_BOUNDS},
     {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}},
    {{QLORA_FP4_VALUES}, {QLORA_FP4_BOUNDS}, {QLORA_FP4_ORDER}},
};

template <typename T>
__global__ void quantize_4bit_kernel(const T* __restrict__ in, int64_t n, int64_t blocksize,
                                     int quant_type, uint8_t* __restrict__ packed,
                                     float* __restrict__ absmax, unsigned long long* bad_block) {
  const int lane = threadIdx.x & 31;
  const int64_t block = static_cast<int64_t>(blockIdx.x) * kWarpsPerCta + (threadIdx.x >> 5);
  const int64_t start = block * blocksize;
  if (start >= n) return;
  const int64_t len = min(blocksize, n - start);
  const FourBitTables& t = c_tables[quant_type];

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
  const uint8_t pad = detail::encode_4bit(0.f, t);
  for (int64_t p = lane; 2 * p < len; p += 32) {
    const int64_t i = 2 * p;
    auto encode = [&](float x) {
      return detail::encode_4bit(
          partial ? detail::normalise_partial(x, amax) : detail::normalise_full(x, inv), t);
    };
    const uint8_t hi = encode(to_float(in[start + i]));
    const uint8_t lo = i + 1 < len ? encode(to_float(in[start + i + 1])) : pad;
    packed[(start + i) / 2] = detail::pack_pair(hi, lo);
  }
}

// One packed byte (elements 2j and 2j + 1) per thread; `scale_of(block)`
// gives the block's absmax. blocksize is even, so a byte's two elements
// share one block.
template <typename T, typename ScaleOf>
__device__ __forceinline__ void dequantize_4bit_bytes(const uint8_t* __restrict__ packed, int64_t n,
                                                      int64_t blocksize, const float* values,
                                                      T* __restrict__ out, ScaleOf scale_of) {
  const int64_t nbytes = (n + 1) / 2;
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < nbytes;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint8_t byte = packed[j];
    const int64_t i = 2 * j;
    const float scale = scale_of(i / blocksize);
    out[i] = from_float<T>(values[byte >> 4] * scale);
    if (i + 1 < n) out[i + 1] = from_float<T>(values[byte & 0x0F] * scale);
  }
}

template <typename T>
__global__ void dequantize_4bit_kernel(const uint8_t* __restrict__ packed,
                                       const float* __restrict__ absmax, int64_t n,
                                       int64_t blocksize, int quant_type, T* __restrict__ out) {
  dequantize_4bit_bytes(packed, n, blocksize, c_tables[quant_type].values, out,
                        [&](int64_t block) { return __ldg(absmax + block); });
}

// The nested statistics are decoded per byte (a table lookup, a product and
// a sum): cheaper than a kernel launch and a float32 absmax tensor per call.
template <typename T>
__global__ void dequantize_4bit_nested_kernel(const uint8_t* __restrict__ packed,
                                              const uint8_t* __restrict__ absmax_8bit,
                                              const float* __restrict__ nested_absmax,
                                              const float* __restrict__ code8,
                                              const float* __restrict__ offset, int64_t n,
                                              int64_t blocksize, int quant_type,
                                              T* __restrict__ out) {
  __shared__ float table8[256];
  for (int i = threadIdx.x; i < 256; i += blockDim.x) table8[i] = code8[i];
  __syncthreads();
  const float shift = __ldg(offset);
  dequantize_4bit_bytes(packed, n, blocksize, c_tables[quant_type].values, out, [&](int64_t block) {
    const float first = table8[__ldg(absmax_8bit + block)] * __ldg(nested_absmax + block / 256);
    return first + shift;
  });
}

}  // namespace

cudaError_t dequantize_4bit_nested(const uint8_t* packed, const uint8_t* absmax_8bit,
                                   const float* nested_absmax, const float* code8,
                                   const float* offset, int64_t n, int64_t blocksize,
                                   int quant_type, void* out, Dtype dtype, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    dequantize_4bit_nested_kernel<T><<<grid_for((n + 1) / 2), kThreads, 0, stream>>>(
        packed, absmax_8bit, nested_absmax, code8, offset, n, blocksize, quant_type,
        static_cast<T*>(out));
    return cudaGetLastError();
  });
}

cudaError_t quantize_4bit(const void* in, Dtype dtype, int64_t n, int64_t blocksize, int quant_type,
                          uint8_t* packed, float* absmax, unsigned long long* bad_block,
                          cudaStream_t stream) {
  const int64_t blocks = detail::ceil_div(n, blocksize);
  if (blocks == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const unsigned grid = static_cast<unsigned>(detail::ceil_div(blocks, kWarpsPerCta));
    quantize_4bit_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(in), n, blocksize,
                                                           quant_type, packed, absmax, bad_block);
    return cudaGetLastError();
  });
}

cudaError_t dequantize_4bit(const uint8_t* packed, const float* absmax, int64_t n,
                            int64_t blocksize, int quant_type, void* out, Dtype dtype,
                            cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    dequantize_4bit_kernel<T><<<grid_for((n + 1) / 2), kThreads, 0, stream>>>(
        packed, absmax, n, blocksize, quant_type, static_cast<T*>(out));
    return cudaGetLastError();
  });
}

}  // namespace qlora::cuda
