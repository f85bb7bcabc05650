// Quantisation of float32 rows to ggml tensor types, bit-exact with ggml's
// reference quantizers (quantize_row_*_ref in
// ggml/src/ggml-quants.c, and gguf-py's gguf.quants.quantize), plus the
// plain F32 / F16 / BF16 conversions (BF16 rounds to nearest even and keeps
// NaNs quiet, as ggml's fp32_to_bf16).
//
// Bit-exactness needs x * id evaluated with one rounding: compile with
// -ffp-contract=off (libqlora's flags).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "qlora/io/gguf.h"

namespace qlora::io::detail {

// Whether quantize_ggml supports `type` (F32, F16, BF16, Q8_0, Q4_0, Q4_1,
// Q5_0, Q5_1, Q4_K, Q5_K, Q6_K; the K-quants from io/ggml_kquants.h, Q8_0
// and Q4_1/Q5_x from io/ggml_legacy_quants.h).
bool ggml_can_quantize(GgmlType type);

// Quantises `numel` float32 values (rows of `row_length`, packed back to
// back) to `type`, returning the bytes as stored in a GGUF data section.
// Throws GgufError naming `name` when the type is unsupported or when
// row_length is not a multiple of the type's block size.
std::vector<uint8_t> quantize_ggml(GgmlType type, const float* src, int64_t numel,
                                   int64_t row_length, const std::string& name);

// One scalar conversion each, as ggml does them.
uint16_t fp32_to_fp16(float x);
uint16_t fp32_to_bf16(float x);

}  // namespace qlora::io::detail
