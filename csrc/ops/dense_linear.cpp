#include "ops/dense_linear.h"

#include <ATen/ops/linear.h>

#include "cpu/onednn_linear.h"

namespace qlora::detail {

bool is_plain_cpu_tensor(const at::Tensor& t) {
  const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  return t.device().is_cpu() && !impl->is_python_dispatch() && !impl->has_symbolic_sizes_strides();
}

at::Tensor dense_linear(const at::Tensor& x, const at::Tensor& w) {
  // Traced tensors first: numel() of a symbolic tensor throws.
  if (!is_plain_cpu_tensor(x) || !is_plain_cpu_tensor(w)) return at::linear(x, w);
  return cpu::dense_linear_cpu(x, w);
}

}  // namespace qlora::detail
