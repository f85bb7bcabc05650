// Plain-C++ entry points of the CUDA kernels. The .cu files include no ATen
// header at all (fast nvcc builds); cuda_ops.cpp turns tensors into these
// calls and registers them on the CUDA dispatch key.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/adamw_math.h"

namespace qlora::cuda {

enum class Dtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// bad_block: device int64 initialised to INT64_MAX; receives the lowest
// block holding inf/NaN.
cudaError_t quantize_4bit(const void* in, Dtype dtype, int64_t n, int64_t blocksize, int quant_type,
                          uint8_t* packed, float* absmax, unsigned long long* bad_block,
                          cudaStream_t stream);

cudaError_t dequantize_4bit(const uint8_t* packed, const float* absmax, int64_t n,
                            int64_t blocksize, int quant_type, void* out, Dtype dtype,
                            cudaStream_t stream);

cudaError_t quantize_blockwise(const void* in, Dtype dtype, int64_t n, int64_t blocksize,
                               const float* code, uint8_t* out, float* absmax,
                               unsigned long long* bad_block, cudaStream_t stream);

cudaError_t dequantize_blockwise(const uint8_t* in, const float* absmax, const float* code,
                                 int64_t n, int64_t blocksize, void* out, Dtype dtype,
                                 cudaStream_t stream);

// dequantize_4bit with double-quantised statistics: block b's scale is
// code8[absmax_8bit[b]] * nested_absmax[b / 256] + *offset (bitsandbytes'
// order), computed in the kernel instead of a separate pass.
cudaError_t dequantize_4bit_nested(const uint8_t* packed, const uint8_t* absmax_8bit,
                                   const float* nested_absmax, const float* code8,
                                   const float* offset, int64_t n, int64_t blocksize,
                                   int quant_type, void* out, Dtype dtype, cudaStream_t stream);

// Fused Adam(W) updates (common/adamw_math.h); p and g of `dtype`.
cudaError_t optimizer_update_32bit(const void* g, void* p, Dtype dtype, float* m, float* v,
                                   int64_t n, const detail::AdamWScalars& s, cudaStream_t stream);
// bad_block as for the quantizers: the lowest block whose new state is inf/NaN.
cudaError_t optimizer_update_8bit_blockwise(const void* g, void* p, Dtype dtype, uint8_t* q1,
                                            uint8_t* q2, const float* map1, const float* map2,
                                            float* absmax1, float* absmax2, int64_t n,
                                            const detail::AdamWScalars& s,
                                            unsigned long long* bad_block, cudaStream_t stream);

// out[m, j] = sum_k A[m, k] * dequant(B)[j, k], accumulated in float32.
cudaError_t gemv_4bit(const void* A, Dtype dtype, int64_t M, int64_t N, int64_t K,
                      const uint8_t* packed, const float* absmax, const float* code,
                      int64_t blocksize, void* out, cudaStream_t stream);

// out[i] = in[i] * 1 / (1 - p) where the (seed, i) hash keeps element i,
// else 0 (common/dropout_hash.h).
cudaError_t hash_dropout(const void* in, Dtype dtype, int64_t n, uint64_t seed, double p, void* out,
                         cudaStream_t stream);

// Decodes `blocks` consecutive ggml blocks of type `code`
// (common/ggml_blocks.h) into `out`, rounded once to `dtype`.
cudaError_t ggml_dequantize(int32_t code, int32_t block_size, int32_t type_size, const uint8_t* src,
                            int64_t blocks, void* out, Dtype dtype, cudaStream_t stream);

}  // namespace qlora::cuda
