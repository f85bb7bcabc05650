// CUDA ggml_dequantize: one thread per ggml block, decoded by the same
// per-block functions as the CPU kernels and the GGUF reader
// (common/ggml_blocks.h; --fmad=false keeps them bit-identical), then
// rounded once to the output dtype.
#include "common/ggml_blocks.h"
#include "cuda/device_utils.cuh"

namespace qlora::cuda {
namespace {

template <typename T>
__global__ void ggml_dequantize_kernel(detail::GgmlCode code, const uint8_t* __restrict__ src,
                                       int64_t blocks, int32_t block_size, int32_t type_size,
                                       T* __restrict__ out) {
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; b < blocks;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float values[256];
    detail::ggml_decode_blocks(code, src + b * type_size, 1, values);
    T* dst = out + b * block_size;
    for (int i = 0; i < block_size; ++i) dst[i] = from_float<T>(values[i]);
  }
}

}  // namespace

cudaError_t ggml_dequantize(int32_t code, int32_t block_size, int32_t type_size, const uint8_t* src,
                            int64_t blocks, void* out, Dtype dtype, cudaStream_t stream) {
  if (blocks == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    ggml_dequantize_kernel<T><<<grid_for(blocks), kThreads, 0, stream>>>(
        static_cast<detail::GgmlCode>(code), src, blocks, block_size, type_size,
        static_cast<T*>(out));
    return cudaGetLastError();
  });
}

}  // namespace qlora::cuda
