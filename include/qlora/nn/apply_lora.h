// apply_lora: turn a model into a (Q)LoRA model in place.
#pragma once

#include <torch/nn/module.h>

#include <optional>
#include <ostream>
#include <string>
#include <vector>

#include "qlora/nn/lora_config.h"

namespace qlora::nn {

struct LoRAReport {
  std::vector<std::string> replaced;  // dotted module names, in tree order
  int64_t trainable_parameters = 0;
  int64_t total_parameters =
      0;                     // trainable + frozen parameters (quantised weights count as elements)
  int64_t memory_bytes = 0;  // parameters + buffers as stored
};
std::ostream& operator<<(std::ostream& os, const LoRAReport& report);

// Walks `root`, replaces every torch::nn::Linear whose name `config`
// matches with a QLoRALinear (quantising its weight; `base` given) or a
// LoRALinear (no `base`), and freezes every other parameter (biases stay
// trainable per config.bias). Linears must sit in LinearHost slots so that
// forward() sees the replacement; anything else is an error naming it. Fails
// when nothing matches, listing the Linear modules that exist.
LoRAReport apply_lora(torch::nn::Module& root, const LoRAConfig& config,
                      const std::optional<QuantizedBaseConfig>& base = std::nullopt);

// Every LoRA layer of the tree with its dotted name.
std::vector<std::pair<std::string, std::shared_ptr<class LoRALayerImpl>>> lora_layers(
    torch::nn::Module& root);

}  // namespace qlora::nn
