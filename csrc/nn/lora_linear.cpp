#include "qlora/nn/lora_linear.h"

#include <ATen/ops/linear.h>

namespace qlora::nn {

LoRALinearImpl::LoRALinearImpl(const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               const LoRAConfig& config)
    : LoRALayerImpl(weight.size(1), weight.size(0), config) {
  TORCH_CHECK(weight.dim() == 2, "LoRALinear: weight must be [out, in], got ", weight.sizes());
  weight_ = register_buffer("weight", weight.detach().clone());
  register_base_bias(bias);
  init_adapter(weight.device());
}

LoRALinearImpl::LoRALinearImpl(const torch::nn::LinearImpl& base, const LoRAConfig& config)
    : LoRALinearImpl(base.weight,
                     base.bias.defined() ? std::optional<at::Tensor>(base.bias) : std::nullopt,
                     config) {}

at::Tensor LoRALinearImpl::base_forward(const at::Tensor& x) {
  const std::optional<at::Tensor> b = base_bias();
  return at::linear(x, weight_.to(x.scalar_type()),
                    b ? std::optional<at::Tensor>(b->to(x.scalar_type())) : std::nullopt);
}

at::Tensor LoRALinearImpl::base_weight(at::ScalarType dtype) const { return weight_.to(dtype); }

std::optional<at::Tensor> LoRALinearImpl::base_bias() const {
  return bias_.defined() ? std::optional<at::Tensor>(bias_) : std::nullopt;
}

void LoRALinearImpl::pretty_print(std::ostream& stream) const {
  stream << "qlora::nn::LoRALinear(in=" << in_features() << ", out=" << out_features() << ", base "
         << weight_.scalar_type() << ", ";
  pretty_print_adapter(stream);
  stream << ")";
}

}  // namespace qlora::nn
