// Argument validation of the ggml ops (ggml_dequantize, ggml_matmul), shared
// by the CPU, CUDA and Meta kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/SymInt.h>
#include <c10/util/ArrayRef.h>

#include <optional>
#include <string_view>

#include "common/ggml_blocks.h"

namespace qlora::detail {

// The layout of `ggml_type` ("Q4_K", any case); an error naming the op and
// the supported types otherwise.
const GgmlBlockLayout& parse_ggml_type(std::string_view op, std::string_view ggml_type);

// ggml_dequantize(blocks, ggml_type, shape, dtype): blocks is a uint8
// tensor of exactly the bytes `shape` needs (rows of whole blocks).
const GgmlBlockLayout& check_ggml_dequantize(const at::Tensor& blocks, std::string_view ggml_type,
                                             c10::SymIntArrayRef shape, at::ScalarType dtype);
// ggml_matmul(x, blocks, ggml_type, shape, bias): shape is [out, in].
const GgmlBlockLayout& check_ggml_matmul(const at::Tensor& x, const at::Tensor& blocks,
                                         std::string_view ggml_type, c10::SymIntArrayRef shape,
                                         const std::optional<at::Tensor>& bias);

}  // namespace qlora::detail
