// Autograd of ggml_matmul on the Autograd key: gradients reach x and bias
// only (the blocks are a frozen buffer). Backward dequantises through the
// ggml_dequantize op, so it runs on any backend and traces under
// torch.compile / AOT autograd.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/sum.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "autograd/ggml_matmul_autograd.h"
#include "ops/dense_linear.h"
#include "qlora/ops.h"

namespace qlora {
namespace {

at::Tensor ggml_matmul_below_autograd(const at::Tensor& x, const at::Tensor& blocks,
                                      std::string_view ggml_type, c10::SymIntArrayRef shape,
                                      const std::optional<at::Tensor>& bias) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("qlora::ggml_matmul", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, std::string_view,
                                         c10::SymIntArrayRef, const std::optional<at::Tensor>&)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(x, blocks, ggml_type, shape, bias);
}

class GgmlMatmulFunction : public torch::autograd::Function<GgmlMatmulFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& blocks, std::string_view ggml_type,
                            c10::SymIntArrayRef shape, const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& replayed) {
    ctx->save_for_backward({blocks});
    ctx->saved_data["ggml_type"] = std::string(ggml_type);
    ctx->saved_data["shape"] = c10::IValue(shape);
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    if (replayed) return replayed->detach();
    return ggml_matmul_below_autograd(x, blocks, ggml_type, shape, bias);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    const at::Tensor& grad_out = grad_outputs[0];
    std::vector<c10::SymInt> shape;
    for (const auto& s : ctx->saved_data["shape"].toListRef()) shape.push_back(s.toSymInt());
    at::Tensor grad_x, grad_bias;
    if (ctx->needs_input_grad(0)) {
      const at::Tensor blocks = ctx->get_saved_variables()[0];
      const auto dtype = grad_out.scalar_type();
      const auto w_dtype = dtype == at::kDouble ? at::kFloat : dtype;
      const at::Tensor W =
          ggml_dequantize_symint(blocks, ctx->saved_data["ggml_type"].toStringRef(), shape, w_dtype)
              .to(dtype);
      // A double backward (create_graph) needs the differentiable at::matmul.
      grad_x = at::GradMode::is_enabled() ? at::matmul(grad_out, W)
                                          : detail::dense_linear(grad_out, W.t());
    }
    // needs_input_grad counts tensor arguments only: x, blocks, bias.
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2))
      grad_bias = grad_out.reshape_symint({-1, shape[0]}).sum(0);
    return {grad_x, at::Tensor(), at::Tensor(), at::Tensor(), grad_bias, at::Tensor()};
  }
};

at::Tensor ggml_matmul_autograd(const at::Tensor& x, const at::Tensor& blocks,
                                std::string_view ggml_type, c10::SymIntArrayRef shape,
                                const std::optional<at::Tensor>& bias) {
  return GgmlMatmulFunction::apply(x, blocks, ggml_type, shape, bias, std::optional<at::Tensor>());
}

}  // namespace

namespace detail {

at::Tensor ggml_matmul_replay(const at::Tensor& x, const at::Tensor& blocks,
                              std::string_view ggml_type, at::IntArrayRef shape,
                              const std::optional<at::Tensor>& bias, const at::Tensor& output) {
  TORCH_CHECK(output.defined() && !output.requires_grad(),
              "ggml_matmul_replay: the recorded output must be a tensor without grad");
  return GgmlMatmulFunction::apply(x, blocks, ggml_type, c10::fromIntArrayRefSlow(shape), bias,
                                   std::optional<at::Tensor>(output));
}

}  // namespace detail

TORCH_LIBRARY_IMPL(qlora, Autograd, m) {
  m.impl("ggml_matmul", &ggml_matmul_autograd);
  m.impl("ggml_dequantize", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace qlora
