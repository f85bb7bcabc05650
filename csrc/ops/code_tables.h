// The code tables for the kernels: host arrays (CUDA keeps its own
// __constant__ copies of common/codebooks.h) and cached device tensors.
#pragma once

#include <ATen/core/Tensor.h>

#include <string_view>

#include "common/quant_math.h"

namespace qlora::detail {

const FourBitTables& host_tables(QuantType type);

// 16-entry NF4/FP4 table on `device`, created once per (type, device).
at::Tensor code_table_on(std::string_view quant_type, c10::Device device);

}  // namespace qlora::detail
