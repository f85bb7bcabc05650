// The code tables of bitsandbytes' formats as float32 tensors: the 16-entry
// NF4 and FP4 tables of the 4-bit quantizers and the 256-entry dynamic maps
// of the 8-bit blockwise quantizer (the double-quantized scales, 8-bit
// optimizer state). Their values are generated from bitsandbytes into
// csrc/common/codebooks.h, the one source the CPU and CUDA kernels share.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

namespace qlora {

at::Tensor code_table_4bit(const std::string& quant_type);  // "nf4" or "fp4": float32 [16]
at::Tensor dynamic_map(bool is_signed);                     // float32 [256]

}  // namespace qlora
