// hash_dropout's autograd: forward saves p and the seed, never the mask or
// the input; backward applies the same mask and scale to the gradient, by
// calling the op again (so double backward is the op's own autograd).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "qlora/ops.h"

namespace qlora {
namespace {

at::Tensor hash_dropout_below_autograd(const at::Tensor& input, double p, int64_t seed) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("qlora::hash_dropout", "")
                       .typed<at::Tensor(const at::Tensor&, double, int64_t)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(input, p, seed);
}

class HashDropoutFunction : public torch::autograd::Function<HashDropoutFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& input,
                            double p, int64_t seed) {
    ctx->saved_data["p"] = p;
    ctx->saved_data["seed"] = seed;
    return hash_dropout_below_autograd(input, p, seed);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_out) {
    at::Tensor g = grad_out[0];
    if (g.defined())
      g = hash_dropout(g, ctx->saved_data["p"].toDouble(), ctx->saved_data["seed"].toInt());
    return {g, at::Tensor(), at::Tensor()};
  }
};

at::Tensor hash_dropout_autograd(const at::Tensor& input, double p, int64_t seed) {
  return HashDropoutFunction::apply(input, p, seed);
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora, Autograd, m) { m.impl("hash_dropout", &hash_dropout_autograd); }

}  // namespace qlora
