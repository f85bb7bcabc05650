// TorchScript export of models containing (Q)LoRA layers: a torch::jit::Module
// built in C++ with the same buffers and parameters and TorchScript methods
// that call torch.ops.qlora.*. Save it with .save(); load it with
// torch::jit::load in C++ or torch.jit.load in Python after
// torch.ops.load_library. Exported modules compute the eval-mode forward.
#pragma once

#include <torch/csrc/jit/api/module.h>
#include <torch/nn/module.h>

#include <string>
#include <utility>
#include <vector>

namespace qlora::nn {
class LoRALayerImpl;
}

namespace qlora::exporters {

// One LoRALinear / QLoRALinear (LoRA or DoRA) as a TorchScript module.
torch::jit::Module script_lora_layer(const nn::LoRALayerImpl& layer);

// A supported module tree as TorchScript: LoRA layers, torch::nn::Linear,
// ReLU / GELU / SiLU / Tanh, and torch::nn::Sequential of these. Anything
// else is an error naming the module's type.
torch::jit::Module script_module(torch::nn::Module& module);

// Chains scripted submodules and activations into one module.
class SequentialBuilder {
 public:
  SequentialBuilder& add(const std::string& name, torch::jit::Module module);
  SequentialBuilder& add_activation(const std::string& function);  // relu, gelu, silu, tanh
  torch::jit::Module build(const std::string& class_name = "QLoRASequential") const;

 private:
  std::vector<std::pair<std::string, torch::jit::Module>> modules_;
  std::vector<std::string> steps_;  // "self.<name>(x)" or "torch.relu(x)"-style calls
};

}  // namespace qlora::exporters
