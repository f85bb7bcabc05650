// Host copies of the 4-bit tables (CUDA keeps its own __constant__ copies).
#pragma once

#include "quant_math.h"

namespace qlora::detail {

const FourBitTables& host_tables(QuantType type);

}  // namespace qlora::detail
