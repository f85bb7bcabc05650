// CUDA hash_dropout: one thread per element, the mask from the same
// per-element function as the CPU kernel (common/dropout_hash.h), so both
// devices drop the same elements for a seed.
#include "common/dropout_hash.h"
#include "cuda/device_utils.cuh"

namespace qlora::cuda {
namespace {

template <typename T>
__global__ void hash_dropout_kernel(const T* __restrict__ in, T* __restrict__ out, int64_t n,
                                    detail::DropoutKey key) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const bool keep = detail::dropout_keeps(key, static_cast<uint64_t>(i));
    out[i] = from_float<T>(keep ? to_float(in[i]) * key.scale : 0.0f);
  }
}

}  // namespace

cudaError_t hash_dropout(const void* in, Dtype dtype, int64_t n, uint64_t seed, double p, void* out,
                         cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const detail::DropoutKey key = detail::dropout_key(seed, p);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    hash_dropout_kernel<T><<<grid_for(n), kThreads, 0, stream>>>(static_cast<const T*>(in),
                                                                 static_cast<T*>(out), n, key);
    return cudaGetLastError();
  });
}

}  // namespace qlora::cuda
