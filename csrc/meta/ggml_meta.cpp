// Meta kernels of the ggml-block ops: shapes and dtypes with SymInt sizes,
// after the same argument checks as the real kernels.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <vector>

#include "ops/ggml_checks.h"

namespace qlora::meta {
namespace {

at::Tensor ggml_dequantize_meta(const at::Tensor& blocks, std::string_view ggml_type,
                                c10::SymIntArrayRef shape, at::ScalarType dtype) {
  detail::check_ggml_dequantize(blocks, ggml_type, shape, dtype);
  return at::empty_symint(shape, blocks.options().dtype(dtype));
}

at::Tensor ggml_matmul_meta(const at::Tensor& x, const at::Tensor& blocks,
                            std::string_view ggml_type, c10::SymIntArrayRef shape,
                            const std::optional<at::Tensor>& bias) {
  detail::check_ggml_matmul(x, blocks, ggml_type, shape, bias);
  std::vector<c10::SymInt> out(x.sym_sizes().begin(), x.sym_sizes().end() - 1);
  out.push_back(shape[0]);
  return at::empty_symint(out, x.options());
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora, Meta, m) {
  m.impl("ggml_dequantize", &ggml_dequantize_meta);
  m.impl("ggml_matmul", &ggml_matmul_meta);
}

}  // namespace qlora::meta
