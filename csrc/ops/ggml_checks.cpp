#include "ops/ggml_checks.h"

#include <c10/util/Exception.h>

#include <cctype>
#include <string>

#include "ops/checks.h"

namespace qlora::detail {

namespace {

std::string supported_ggml_types() {
  std::string out;
  for (const GgmlBlockLayout& l : kGgmlBlockLayouts)
    out += (out.empty() ? "" : ", ") + std::string(l.name);
  return out;
}

// The bytes of a [rows, cols] weight in `layout`: rows of whole blocks.
c10::SymInt checked_ggml_bytes(std::string_view op, const GgmlBlockLayout& layout,
                               c10::SymIntArrayRef shape) {
  TORCH_CHECK(shape.size() == 2, "qlora::", op, ": shape must be [out_features, in_features], got ",
              shape);
  checked_numel(op, shape);
  TORCH_CHECK(shape[1] % layout.block_size == 0, "qlora::", op, ": in_features ", shape[1],
              " is not a multiple of the ", layout.name, " block size ", layout.block_size);
  return shape[0] * (shape[1] / layout.block_size) * layout.type_size;
}

}  // namespace

const GgmlBlockLayout& parse_ggml_type(std::string_view op, std::string_view ggml_type) {
  std::string upper(ggml_type);
  for (char& c : upper) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  for (const GgmlBlockLayout& l : kGgmlBlockLayouts)
    if (upper == l.name) return l;
  TORCH_CHECK(false, "qlora::", op, ": ggml_type \"", std::string(ggml_type),
              "\" is not supported; expected one of ", supported_ggml_types());
}

const GgmlBlockLayout& check_ggml_dequantize(const at::Tensor& blocks, std::string_view ggml_type,
                                             c10::SymIntArrayRef shape, at::ScalarType dtype) {
  constexpr std::string_view op = "ggml_dequantize";
  const GgmlBlockLayout& layout = parse_ggml_type(op, ggml_type);
  check_float_dtype(op, "dtype", dtype);
  TORCH_CHECK(blocks.scalar_type() == at::kByte, "qlora::", op, ": blocks must be uint8, got ",
              blocks.scalar_type());
  const c10::SymInt need = checked_ggml_bytes(op, layout, shape);
  TORCH_CHECK(blocks.sym_numel() == need, "qlora::", op, ": blocks holds ", blocks.sym_numel(),
              " bytes but a ", layout.name, " tensor of shape ", shape, " needs ", need);
  return layout;
}

const GgmlBlockLayout& check_ggml_matmul(const at::Tensor& x, const at::Tensor& blocks,
                                         std::string_view ggml_type, c10::SymIntArrayRef shape,
                                         const std::optional<at::Tensor>& bias) {
  constexpr std::string_view op = "ggml_matmul";
  const GgmlBlockLayout& layout = parse_ggml_type(op, ggml_type);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf ||
                  x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kDouble,
              "qlora::", op, ": x must be float32, float16, bfloat16 or float64, got ",
              x.scalar_type());
  check_same_device(op, x, "x", blocks, "blocks");
  TORCH_CHECK(blocks.scalar_type() == at::kByte, "qlora::", op, ": blocks must be uint8, got ",
              blocks.scalar_type());
  const c10::SymInt need = checked_ggml_bytes(op, layout, shape);
  TORCH_CHECK(blocks.sym_numel() == need, "qlora::", op, ": blocks holds ", blocks.sym_numel(),
              " bytes but a ", layout.name, " weight of shape ", shape, " needs ", need);
  TORCH_CHECK(x.dim() >= 1 && x.sym_size(-1) == shape[1], "qlora::", op, ": x's last dimension (",
              x.dim() ? x.sym_size(-1) : c10::SymInt(0),
              ") must equal in_features shape[1] = ", shape[1]);
  if (bias && bias->defined()) {
    check_same_device(op, x, "x", *bias, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->sym_size(0) == shape[0], "qlora::", op,
                ": bias must have out_features = ", shape[0], " elements, got shape ",
                bias->sym_sizes());
  }
  return layout;
}

}  // namespace qlora::detail
