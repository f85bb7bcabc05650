// Dequantisation of ggml tensor blocks to float32, bit-exact with ggml's
// reference dequantize_row_* functions (ggml/src/ggml-quants.c) and with
// gguf-py's gguf.quants.dequantize.
//
// Bit-exactness needs a*b+c evaluated as two roundings: this file must be
// compiled with -ffp-contract=off (libqlora's flags), or an FMA-capable
// target could fuse Q4_1/Q5_1/Q4_K's x*d + m.
#pragma once

#include <cstdint>

#include "qlora/io/gguf.h"

namespace qlora::io::detail {

// Dequantises `numel` elements of `type` (a whole number of blocks, packed
// back to back as in a GGUF data section) from `src` into `dst`, in
// parallel with at::parallel_for. `src` needs no particular alignment.
// Requires ggml_can_dequantize(type) and numel % block_size == 0 (callers
// check both; this only asserts).
void dequantize_ggml(GgmlType type, const uint8_t* src, int64_t numel, float* dst);

}  // namespace qlora::io::detail
