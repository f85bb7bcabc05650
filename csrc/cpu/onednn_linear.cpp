#include "onednn_linear.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/linear.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <optional>

namespace qlora::cpu {
namespace {

std::atomic<bool>& enabled_flag() {
  static std::atomic<bool> flag{[] {
    const char* env = std::getenv("QLORA_ONEDNN");
    return !(env && std::strcmp(env, "0") == 0);
  }()};
  return flag;
}

// The op is registered by libtorch_cpu when it is built with oneDNN (all x86
// Linux wheels); looked up once, absent means "use at::linear".
const std::optional<c10::OperatorHandle>& linear_pointwise_op() {
  static const std::optional<c10::OperatorHandle> op =
      c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
  return op;
}

}  // namespace

bool onednn_enabled() { return enabled_flag().load(std::memory_order_relaxed); }
void set_onednn_enabled(bool enabled) { enabled_flag().store(enabled); }

bool onednn_dtype_supported(at::ScalarType dtype) {
  return onednn_enabled() && linear_pointwise_op() &&
         (dtype == at::kFloat || dtype == at::kBFloat16);
}

bool onednn_linear_supported(const at::Tensor& x, const at::Tensor& w) {
  const auto dtype = x.scalar_type();
  return detail::is_plain_cpu_tensor(x) && detail::is_plain_cpu_tensor(w) &&
         onednn_dtype_supported(dtype) && w.dim() == 2 && x.dim() >= 1 &&
         w.scalar_type() == dtype && x.size(-1) == w.size(1) && w.size(0) > 0 && w.size(1) > 0;
}

at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(onednn_linear_supported(x, w), "onednn_linear: unsupported operands ", x.sizes(), " ",
              x.scalar_type(), " x ", w.sizes(), " ", w.scalar_type());
  // A boxed call: the schema's `Scalar?[]` has no stable unboxed C++ type
  // across releases, the IValue stack does.
  torch::jit::Stack stack;
  stack.reserve(6);
  stack.emplace_back(x.dim() == 1 ? x.unsqueeze(0) : x);
  stack.emplace_back(w);
  stack.emplace_back(c10::IValue());
  stack.emplace_back(std::string("none"));
  stack.emplace_back(c10::List<std::optional<at::Scalar>>());
  stack.emplace_back(std::string(""));
  linear_pointwise_op()->callBoxed(stack);
  at::Tensor y = stack.back().toTensor();
  return x.dim() == 1 ? y.squeeze(0) : y;
}

}  // namespace qlora::cpu

namespace qlora::detail {

bool is_plain_cpu_tensor(const at::Tensor& t) {
  const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  return t.device().is_cpu() && !impl->is_python_dispatch() && !impl->has_symbolic_sizes_strides();
}

at::Tensor dense_linear(const at::Tensor& x, const at::Tensor& w) {
  if (cpu::onednn_linear_supported(x, w) && x.numel() > 0) return cpu::onednn_linear(x, w);
  return at::linear(x, w);
}

}  // namespace qlora::detail
