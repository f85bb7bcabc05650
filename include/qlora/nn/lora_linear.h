// LoRA (and DoRA) over an un-quantised frozen Linear.
#pragma once

#include <torch/nn/pimpl.h>

#include "qlora/nn/lora_layer.h"

namespace qlora::nn {

class LoRALinearImpl : public LoRALayerImpl {
 public:
  LoRALinearImpl(const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                 const LoRAConfig& config);
  explicit LoRALinearImpl(const torch::nn::LinearImpl& base, const LoRAConfig& config);

  at::Tensor base_forward(const at::Tensor& x) override;
  at::Tensor base_weight(at::ScalarType dtype) const override;
  std::optional<at::Tensor> base_bias() const override;
  void pretty_print(std::ostream& stream) const override;

 private:
  at::Tensor weight_;  // frozen buffer "weight"
};
TORCH_MODULE(LoRALinear);

}  // namespace qlora::nn
