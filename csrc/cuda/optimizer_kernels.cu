// CUDA kernels of the fused optimizer updates. 32-bit: one thread per
// element. 8-bit: one warp per 256-element block (8 elements per lane in
// registers): dequantise, update, warp-reduce the new absmax, re-quantise;
// the per-element rules are common/adamw_math.h and common/quant_math.h, so
// the result is the CPU kernel's bit for bit.
#include "common/adamw_math.h"
#include "cuda/device_utils.cuh"

namespace qlora::cuda {
namespace {

using detail::AdamWScalars;
constexpr int kBlock = 256;
constexpr int kPerLane = kBlock / 32;

template <typename T>
__global__ void update_32bit_kernel(const T* __restrict__ g, T* __restrict__ p,
                                    float* __restrict__ m, float* __restrict__ v, int64_t n,
                                    AdamWScalars s) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float pi = to_float(p[i]), mi = m[i], vi = v[i];
    if (detail::adamw_element(to_float(g[i]), pi, mi, vi, s)) {
      p[i] = from_float<T>(pi);
      m[i] = mi;
      v[i] = vi;
    }
  }
}

// Re-quantises the warp's block (x[k] is element lane + 32 k); false when it
// holds inf/NaN. All lanes take part.
__device__ bool requantize_warp(const float (&x)[kPerLane], int64_t start, int64_t len,
                                const float* bounds, uint8_t* codes, float* absmax, int64_t block) {
  const int lane = threadIdx.x & 31;
  uint32_t bits = 0;
#pragma unroll
  for (int k = 0; k < kPerLane; ++k)
    if (lane + 32 * k < len) bits = max(bits, detail::abs_bits(x[k]));
  bits = warp_max_u32(bits);
  if (bits >= detail::kNonFiniteBits) return false;
  const float amax = detail::bits_float(bits);
  const bool partial = len < kBlock;
  if (lane == 0) absmax[block] = partial ? fmaxf(amax, detail::kMinAbsmax) : amax;
  const float inv = detail::reciprocal_scale(amax);
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) {
    const int64_t i = lane + 32 * k;
    if (i < len) codes[start + i] = detail::encode_state_8bit(x[k], amax, inv, partial, bounds);
  }
  return true;
}

template <typename T>
__global__ void update_8bit_kernel(const T* __restrict__ g, T* __restrict__ p,
                                   uint8_t* __restrict__ q1, uint8_t* __restrict__ q2,
                                   const float* __restrict__ map1, const float* __restrict__ map2,
                                   float* __restrict__ absmax1, float* __restrict__ absmax2,
                                   int64_t n, AdamWScalars s, unsigned long long* bad_block) {
  __shared__ float table1[256], table2[256], bounds1[255], bounds2[255];
  for (int i = threadIdx.x; i < 256; i += blockDim.x) {
    table1[i] = map1[i];
    table2[i] = map2[i];
  }
  __syncthreads();
  for (int i = threadIdx.x; i < 255; i += blockDim.x) {
    bounds1[i] = (table1[i] + table1[i + 1]) / 2.0f;
    bounds2[i] = (table2[i] + table2[i + 1]) / 2.0f;
  }
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int64_t block = static_cast<int64_t>(blockIdx.x) * kWarpsPerCta + (threadIdx.x >> 5);
  const int64_t start = block * kBlock;
  if (start >= n) return;
  const int64_t len = min(static_cast<int64_t>(kBlock), n - start);
  const float scale1 = absmax1[block], scale2 = absmax2[block];
  float m[kPerLane], v[kPerLane];
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) {
    const int64_t i = lane + 32 * k;
    m[k] = v[k] = 0.f;
    if (i >= len) continue;
    m[k] = table1[q1[start + i]] * scale1;
    v[k] = table2[q2[start + i]] * scale2;
    float pi = to_float(p[start + i]);
    if (detail::adamw_element(to_float(g[start + i]), pi, m[k], v[k], s))
      p[start + i] = from_float<T>(pi);
  }
  const bool ok1 = requantize_warp(m, start, len, bounds1, q1, absmax1, block);
  const bool ok2 = requantize_warp(v, start, len, bounds2, q2, absmax2, block);
  if ((!ok1 || !ok2) && lane == 0) atomicMin(bad_block, static_cast<unsigned long long>(block));
}

}  // namespace

cudaError_t optimizer_update_32bit(const void* g, void* p, Dtype dtype, float* m, float* v,
                                   int64_t n, const AdamWScalars& s, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    update_32bit_kernel<T><<<grid_for(n), kThreads, 0, stream>>>(static_cast<const T*>(g),
                                                                 static_cast<T*>(p), m, v, n, s);
    return cudaGetLastError();
  });
}

cudaError_t optimizer_update_8bit_blockwise(const void* g, void* p, Dtype dtype, uint8_t* q1,
                                            uint8_t* q2, const float* map1, const float* map2,
                                            float* absmax1, float* absmax2, int64_t n,
                                            const AdamWScalars& s, unsigned long long* bad_block,
                                            cudaStream_t stream) {
  const int64_t blocks = detail::ceil_div(n, kBlock);
  if (blocks == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const unsigned grid = static_cast<unsigned>(detail::ceil_div(blocks, kWarpsPerCta));
    update_8bit_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(g),
                                                         static_cast<T*>(p), q1, q2, map1, map2,
                                                         absmax1, absmax2, n, s, bad_block);
    return cudaGetLastError();
  });
}

}  // namespace qlora::cuda
