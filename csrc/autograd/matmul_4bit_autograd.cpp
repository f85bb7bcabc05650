// Autograd of matmul_4bit, registered on the Autograd key: gradients flow to
// x and bias only (the 4-bit weight is a frozen buffer). Forward re-enters
// the dispatcher below autograd; backward calls dequantize_4bit as an op, so
// both run on any backend and trace under torch.compile / AOT autograd.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/sum.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "../ops/code_tables.h"

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

class Matmul4bitFunction : public torch::autograd::Function<Matmul4bitFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& B, const at::Tensor& absmax, int64_t blocksize,
                            std::string_view quant_type, c10::SymIntArrayRef shapeB,
                            const std::optional<at::Tensor>& bias) {
    ctx->save_for_backward({B, absmax});
    ctx->saved_data["blocksize"] = blocksize;
    ctx->saved_data["quant_type"] = std::string(quant_type);
    ctx->saved_data["shapeB"] = c10::IValue(shapeB);
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
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
      const at::Tensor W = detail::dequantize_weight_as(
          saved[0], saved[1], ctx->saved_data["blocksize"].toInt(),
          ctx->saved_data["quant_type"].toStringRef(), shapeB, grad_out.scalar_type());
      grad_x = at::matmul(grad_out, W);
    }
    // needs_input_grad counts tensor arguments only: x, B, absmax, bias.
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(3)) {
      grad_bias = grad_out.reshape_symint({-1, shapeB[0]}).sum(0);
    }
    return {grad_x,       at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), grad_bias};
  }
};

at::Tensor matmul_4bit_autograd(const at::Tensor& x, const at::Tensor& B, const at::Tensor& absmax,
                                int64_t blocksize, std::string_view quant_type,
                                c10::SymIntArrayRef shapeB, const std::optional<at::Tensor>& bias) {
  return Matmul4bitFunction::apply(x, B, absmax, blocksize, quant_type, shapeB, bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora, Autograd, m) {
  m.impl("matmul_4bit", &matmul_4bit_autograd);
  // The quantizers are not differentiable: backpropagating through them is
  // an error that names the op, never a silent zero gradient.
  for (const char* op : {"quantize_4bit", "dequantize_4bit", "quantize_blockwise",
                         "dequantize_blockwise", "gemv_4bit"})
    m.impl(op, torch::autograd::autogradNotImplementedFallback());
}

}  // namespace qlora
