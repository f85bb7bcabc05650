// The 4-bit code tables as (cached) float32 tensors on any device.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/SymInt.h>

#include <string_view>

namespace qlora::detail {

// 16-entry NF4/FP4 table on `device`, created once per (type, device).
at::Tensor code_table_on(std::string_view quant_type, c10::Device device);

// dequant(W) in `dtype`; float64 (for gradcheck) goes through float32, the
// widest dtype the 4-bit kernels produce, and is exact in float64.
at::Tensor dequantize_weight_as(const at::Tensor& B, const at::Tensor& absmax, int64_t blocksize,
                                std::string_view quant_type, c10::SymIntArrayRef shapeB,
                                at::ScalarType dtype);

}  // namespace qlora::detail
