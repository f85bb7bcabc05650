#include "tables.h"

namespace qlora::detail {

namespace {
const FourBitTables kNF4 = {
    {QLORA_NF4_VALUES}, {QLORA_NF4_BOUNDS}, {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}};
const FourBitTables kFP4 = {{QLORA_FP4_VALUES}, {QLORA_FP4_BOUNDS}, {QLORA_FP4_ORDER}};
}  // namespace

const FourBitTables& host_tables(QuantType type) { return type == QuantType::kNF4 ? kNF4 : kFP4; }

}  // namespace qlora::detail
