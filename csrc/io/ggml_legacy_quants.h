// Encoders for ggml's 32-element block types Q4_1, Q5_0, Q5_1 and Q8_0
// whose bytes match llama.cpp's reference quantizers
// (quantize_row_{q4_1,q5_0,q5_1,q8_0}_ref in ggml/src/ggml-quants.c), i.e.
// what `llama-quantize` writes without an importance matrix. The K-quant
// mixes need them: llama-quantize falls back from Q4_K to Q5_0, from Q5_K to
// Q5_1 and from Q6_K to Q8_0 for rows that are not a multiple of 256.
// Torch-free, like io/ggml_kquants.h, so standalone tools and tests can
// build it on its own.
//
// Bit-exactness needs every float operation rounded on its own, in ggml's
// order: compile with -ffp-contract=off (libqlora's flags).
#pragma once

#include <cstdint>

namespace qlora::io::detail {

// Elements per block, and bytes per encoded block.
inline constexpr int64_t kLegacyQuantBlock = 32;
inline constexpr int64_t kQ4_1Bytes = 20;  // f16 d, f16 m, qs[16]
inline constexpr int64_t kQ5_0Bytes = 22;  // f16 d, qh[4], qs[16]
inline constexpr int64_t kQ5_1Bytes = 24;  // f16 d, f16 m, qh[4], qs[16]
inline constexpr int64_t kQ8_0Bytes = 34;  // f16 d, int8 qs[32]

// Each encodes `n_blocks` blocks of 32 floats (src, packed back to back)
// into dst (n_blocks * the type's block bytes, little-endian), bit-identical
// to llama.cpp's reference quantizer for that type, including its results
// for non-finite and overflowing inputs on x86-64.
void quantize_q4_1(const float* src, int64_t n_blocks, uint8_t* dst);
void quantize_q5_0(const float* src, int64_t n_blocks, uint8_t* dst);
void quantize_q5_1(const float* src, int64_t n_blocks, uint8_t* dst);
void quantize_q8_0(const float* src, int64_t n_blocks, uint8_t* dst);

}  // namespace qlora::io::detail
