#include "qlora/nn/linear_cross_entropy.h"

#include <ATen/ops/_log_softmax.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full_like.h>
#include <ATen/ops/zeros.h>
#include <torch/autograd.h>

#include "ops/dense_linear.h"

namespace qlora::nn {
namespace {

// Adds the chunk's loss to `loss`; with `grad_hidden` defined, writes the
// chunk's d(loss)/d(hidden) there.
void chunk_loss(const at::Tensor& h, const at::Tensor& weight, const at::Tensor& labels,
                at::Tensor& loss, const at::Tensor& grad_hidden) {
  const at::Tensor logits = detail::dense_linear(h, weight).to(at::kFloat);
  at::Tensor log_probs = at::_log_softmax(logits, 1, false);
  const at::Tensor label_col = labels.unsqueeze(1);
  loss.sub_(log_probs.gather(1, label_col).sum());
  if (!grad_hidden.defined()) return;
  at::Tensor probs = log_probs.exp_();
  probs.scatter_add_(1, label_col, at::full_like(label_col, -1, probs.options()));
  grad_hidden.copy_(detail::dense_linear(probs.to(weight.scalar_type()), weight.t()));
}

at::Tensor chunked_loss(const at::Tensor& hidden, const at::Tensor& weight,
                        const at::Tensor& labels, int64_t chunk_rows,
                        const at::Tensor& grad_hidden) {
  at::Tensor loss = at::zeros({}, hidden.options().dtype(at::kFloat));
  for (int64_t r0 = 0; r0 < hidden.size(0); r0 += chunk_rows) {
    const int64_t n = std::min(chunk_rows, hidden.size(0) - r0);
    chunk_loss(hidden.narrow(0, r0, n), weight, labels.narrow(0, r0, n), loss,
               grad_hidden.defined() ? grad_hidden.narrow(0, r0, n) : at::Tensor());
  }
  return loss;
}

class LinearCrossEntropy : public torch::autograd::Function<LinearCrossEntropy> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& hidden,
                            const at::Tensor& weight, const at::Tensor& labels,
                            int64_t chunk_rows) {
    const at::Tensor grad_hidden = at::empty_like(hidden, at::MemoryFormat::Contiguous);
    const at::Tensor loss = chunked_loss(hidden, weight, labels, chunk_rows, grad_hidden);
    ctx->save_for_backward({grad_hidden});
    return loss;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    const at::Tensor grad_hidden = ctx->get_saved_variables()[0];
    return {grad_hidden.mul(grad_outputs[0].to(grad_hidden.scalar_type())), at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor linear_cross_entropy_sum(const at::Tensor& hidden, const at::Tensor& weight,
                                    const at::Tensor& labels, int64_t chunk_logits) {
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "linear_cross_entropy_sum: hidden must be [rows, H] and weight [V, H], got ",
              hidden.sizes(), " and ", weight.sizes());
  TORCH_CHECK(hidden.scalar_type() == weight.scalar_type(),
              "linear_cross_entropy_sum: hidden and weight dtypes differ (", hidden.scalar_type(),
              " vs ", weight.scalar_type(), ")");
  TORCH_CHECK(
      labels.dim() == 1 && labels.size(0) == hidden.size(0) && labels.scalar_type() == at::kLong,
      "linear_cross_entropy_sum: labels must be int64 [", hidden.size(0), "], got ",
      labels.scalar_type(), " ", labels.sizes());
  TORCH_CHECK(!weight.requires_grad(),
              "linear_cross_entropy_sum: the weight must be frozen (it requires grad)");
  TORCH_CHECK(chunk_logits > 0, "linear_cross_entropy_sum: chunk_logits must be > 0");
  const int64_t V = weight.size(0);
  if (labels.numel() > 0) {
    const bool in_range = labels.min().item<int64_t>() >= 0 && labels.max().item<int64_t>() < V;
    TORCH_CHECK(in_range, "linear_cross_entropy_sum: labels must lie in [0, ", V,
                "); select the labelled rows (label != -100) first");
  }
  const int64_t chunk_rows = std::max<int64_t>(1, chunk_logits / std::max<int64_t>(V, 1));
  if (at::GradMode::is_enabled() && hidden.requires_grad())
    return LinearCrossEntropy::apply(hidden, weight.detach(), labels, chunk_rows);
  return chunked_loss(hidden, weight, labels, chunk_rows, at::Tensor());
}

}  // namespace qlora::nn
