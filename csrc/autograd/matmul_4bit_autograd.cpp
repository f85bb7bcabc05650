// Autograd of matmul_4bit, registered on the Autograd key: gradients flow to
// x and bias only (the 4-bit weight is a frozen buffer). Forward re-enters
// the dispatcher below autograd; backward calls dequantize_4bit as an op, so
// both run on any backend and trace under torch.compile / AOT autograd.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/sum.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "autograd/matmul_4bit_autograd.h"
#include "ops/dense_linear.h"
#include "ops/matmul_4bit_composite.h"
#include "qlora/ops.h"

namespace qlora {
namespace {

at::Tensor matmul_4bit_below_autograd(const at::Tensor& x, const at::Tensor& B,
                                      const at::Tensor& absmax, int64_t blocksize,
                                      std::string_view quant_type, c10::SymIntArrayRef shapeB,
                                      const std::optional<at::Tensor>& bias) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("qlora::matmul_4bit", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         int64_t, std::string_view, c10::SymIntArrayRef,
                                         const std::optional<at::Tensor>&)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(x, B, absmax, blocksize, quant_type, shapeB, bias);
}

// Backward on plain CPU tensors dequantises into one buffer per thread
// (weights of up to 4 M elements) instead of allocating and page-faulting a
// dense weight for every layer and step. Undefined (take the op route) for
// other devices, traced (Python-dispatch) tensors, double backward and
// larger weights.
at::Tensor reused_cpu_weight(const at::Tensor& grad_out, const at::Tensor& B,
                             const at::Tensor& absmax, int64_t blocksize,
                             const std::string& quant_type,
                             const std::vector<c10::SymInt>& shapeB) {
  constexpr int64_t kMaxReused = int64_t{1} << 22;
  const auto dtype = grad_out.scalar_type();
  if (at::GradMode::is_enabled() || !detail::is_plain_cpu_tensor(grad_out) ||
      (dtype != at::kFloat && dtype != at::kBFloat16) || !shapeB[0].maybe_as_int() ||
      !shapeB[1].maybe_as_int())
    return {};
  const int64_t N = *shapeB[0].maybe_as_int(), K = *shapeB[1].maybe_as_int();
  if (N * K > kMaxReused) return {};
  thread_local at::Tensor buffer;
  if (!buffer.defined() || buffer.scalar_type() != dtype || buffer.numel() < N * K)
    buffer = at::empty({N * K}, grad_out.options().dtype(dtype));
  at::Tensor W = buffer.narrow(0, 0, N * K).view({N, K});
  dequantize_4bit_out(W, B, absmax, blocksize, quant_type, {N, K}, dtype);
  return W;
}

class Matmul4bitFunction : public torch::autograd::Function<Matmul4bitFunction> {
 public:
  // `replayed`, when defined, is this very product computed earlier (the
  // recompute tape of selective checkpointing): it is returned instead of
  // being computed again, and backward is unchanged.
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& B, const at::Tensor& absmax, int64_t blocksize,
                            std::string_view quant_type, c10::SymIntArrayRef shapeB,
                            const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& replayed) {
    ctx->save_for_backward({B, absmax});
    ctx->saved_data["blocksize"] = blocksize;
    ctx->saved_data["quant_type"] = std::string(quant_type);
    ctx->saved_data["shapeB"] = c10::IValue(shapeB);
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    if (replayed) return replayed->detach();
    return matmul_4bit_below_autograd(x, B, absmax, blocksize, quant_type, shapeB, bias);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    const at::Tensor& grad_out = grad_outputs[0];
    const auto saved = ctx->get_saved_variables();
    std::vector<c10::SymInt> shapeB;
    for (const auto& s : ctx->saved_data["shapeB"].toListRef()) shapeB.push_back(s.toSymInt());

    at::Tensor grad_x, grad_bias;
    if (ctx->needs_input_grad(0)) {
      const int64_t blocksize = ctx->saved_data["blocksize"].toInt();
      const std::string& quant_type = ctx->saved_data["quant_type"].toStringRef();
      if (const at::Tensor W =
              reused_cpu_weight(grad_out, saved[0], saved[1], blocksize, quant_type, shapeB);
          W.defined()) {
        grad_x = detail::dense_linear(grad_out, W.t());  // oneDNN reads W^T in place
      } else {
        const at::Tensor Wd = detail::dequantize_weight_as(
            saved[0], saved[1], blocksize, quant_type, shapeB, grad_out.scalar_type());
        // A double backward (create_graph) needs the differentiable at::matmul.
        grad_x = at::GradMode::is_enabled() ? at::matmul(grad_out, Wd)
                                            : detail::dense_linear(grad_out, Wd.t());
      }
    }
    // needs_input_grad counts tensor arguments only: x, B, absmax, bias.
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(3)) {
      grad_bias = grad_out.reshape_symint({-1, shapeB[0]}).sum(0);
    }
    return {grad_x,       at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), grad_bias,    at::Tensor()};
  }
};

at::Tensor matmul_4bit_autograd(const at::Tensor& x, const at::Tensor& B, const at::Tensor& absmax,
                                int64_t blocksize, std::string_view quant_type,
                                c10::SymIntArrayRef shapeB, const std::optional<at::Tensor>& bias) {
  return Matmul4bitFunction::apply(x, B, absmax, blocksize, quant_type, shapeB, bias,
                                   std::optional<at::Tensor>());
}

}  // namespace

namespace detail {

at::Tensor matmul_4bit_replay(const at::Tensor& x, const at::Tensor& B, const at::Tensor& absmax,
                              int64_t blocksize, std::string_view quant_type,
                              at::IntArrayRef shapeB, const std::optional<at::Tensor>& bias,
                              const at::Tensor& output) {
  TORCH_CHECK(output.defined() && !output.requires_grad(),
              "matmul_4bit_replay: the recorded output must be a tensor without grad");
  return Matmul4bitFunction::apply(x, B, absmax, blocksize, quant_type,
                                   c10::fromIntArrayRefSlow(shapeB), bias,
                                   std::optional<at::Tensor>(output));
}

}  // namespace detail

TORCH_LIBRARY_IMPL(qlora, Autograd, m) {
  m.impl("matmul_4bit", &matmul_4bit_autograd);
  // The quantizers are not differentiable: backpropagating through them is
  // an error that names the op, never a silent zero gradient.
  for (const char* op : {"quantize_4bit", "dequantize_4bit", "quantize_blockwise",
                         "dequantize_blockwise", "gemv_4bit"})
    m.impl(op, torch::autograd::autogradNotImplementedFallback());
}

}  // namespace qlora
