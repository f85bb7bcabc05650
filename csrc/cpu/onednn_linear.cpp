#include "cpu/onednn_linear.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <c10/util/Logging.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <vector>

#include "ops/dense_linear.h"
#include "qlora/cpu_capability.h"

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

// Set when oneDNN refused a bfloat16 primitive on this machine although the
// level said it should have one (a CPU or oneDNN build we have not seen):
// from then on bfloat16 takes the float32 route.
std::atomic<bool> bf16_refused{false};

// Float32 weight tiles of at most this many elements (4 MB): converted from
// bfloat16/float16 while cache-resident, never a float32 copy of W.
constexpr int64_t kTileElements = int64_t{1} << 20;

at::Tensor float32_gemm(const at::Tensor& x, const at::Tensor& w) {
  return onednn_linear_supported(x, w) ? onednn_linear(x, w) : at::linear(x, w);
}

// y = x W^T with 16-bit operands computed in float32: x converted once, W a
// tile of output features at a time; the result rounded once to x's dtype.
at::Tensor linear_in_float32(const at::Tensor& x, const at::Tensor& w) {
  const int64_t N = w.size(0), K = w.size(1);
  const at::Tensor x2 = x.reshape({-1, K}).to(at::kFloat).contiguous();
  const int64_t tile = std::clamp<int64_t>(kTileElements / std::max<int64_t>(K, 1), 64, N);
  at::Tensor y;
  if (tile >= N) {
    y = float32_gemm(x2, w.to(at::kFloat).contiguous());
  } else {
    y = at::empty({x2.size(0), N}, x2.options());
    for (int64_t n0 = 0; n0 < N; n0 += tile) {
      const int64_t len = std::min(tile, N - n0);
      y.narrow(1, n0, len)
          .copy_(float32_gemm(x2, w.narrow(0, n0, len).to(at::kFloat).contiguous()));
    }
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
  shape.push_back(N);
  return y.to(x.scalar_type()).view(shape);
}

}  // namespace

bool native_bf16_gemm() {
  return cpu_capability() >= CpuCapability::kAvx512Bf16 && onednn_dtype_supported(at::kBFloat16) &&
         !bf16_refused.load(std::memory_order_relaxed);
}

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

at::Tensor dense_linear_cpu(const at::Tensor& x, const at::Tensor& w) {
  if (x.numel() == 0 || w.dim() != 2 || x.scalar_type() != w.scalar_type() ||
      x.size(-1) != w.size(1))
    return at::linear(x, w);
  switch (x.scalar_type()) {
    case at::kFloat:
      return float32_gemm(x, w);
    case at::kBFloat16:
      if (native_bf16_gemm() && onednn_linear_supported(x, w)) {
        try {
          return onednn_linear(x, w);
        } catch (const std::exception& e) {
          bf16_refused.store(true);
          LOG(WARNING) << "qlora: oneDNN has no bfloat16 GEMM on this CPU although it reports "
                       << cpu_capability_name(cpu_capability())
                       << "; bfloat16 GEMMs compute in float32 from now on (" << e.what() << ")";
        }
      }
      return linear_in_float32(x, w);
    case at::kHalf:
      return linear_in_float32(x, w);
    default:
      return at::linear(x, w);
  }
}

}  // namespace qlora::cpu
