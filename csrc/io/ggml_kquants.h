// Encoders for ggml's K-quant super-blocks (Q4_K, Q5_K, Q6_K) whose bytes
// match llama.cpp's reference quantizers (quantize_row_q{4,5,6}_K_ref in
// ggml/src/ggml-quants.c), i.e. what `llama-quantize` writes when it runs
// without an importance matrix. Torch-free so standalone tools and tests can
// build it on its own.
//
// Bit-exactness needs every float operation rounded on its own, in ggml's
// order: compile with -ffp-contract=off (libqlora's flags).
#pragma once

#include <cstdint>

namespace qlora::io::detail {

// Elements per K-quant super-block, and bytes per encoded block.
inline constexpr int64_t kKQuantBlock = 256;
inline constexpr int64_t kQ4KBytes = 144;  // f16 d, f16 dmin, scales[12], qs[128]
inline constexpr int64_t kQ5KBytes = 176;  // f16 d, f16 dmin, scales[12], qh[32], qs[128]
inline constexpr int64_t kQ6KBytes = 210;  // ql[128], qh[64], int8 scales[16], f16 d

// Each encodes `n_blocks` blocks of 256 floats (src, packed back to back)
// into dst (n_blocks * the type's block bytes, little-endian), bit-identical
// to llama.cpp's reference quantizer for that type.
void quantize_q4_k(const float* src, int64_t n_blocks, uint8_t* dst);
void quantize_q5_k(const float* src, int64_t n_blocks, uint8_t* dst);
void quantize_q6_k(const float* src, int64_t n_blocks, uint8_t* dst);

// IEEE binary16 bits of `x`, rounded to nearest even as GGML_FP32_TO_FP16:
// overflow gives infinity, any NaN the quiet NaN 0x7E00 with x's sign.
uint16_t kquant_fp32_to_fp16(float x);

}  // namespace qlora::io::detail
