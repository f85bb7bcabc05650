// LibTorch modules call their children through C++ members, so replacing a
// registered child (Module::replace_module) does not change what forward()
// calls. Modules that want their Linear layers swappable by apply_lora hold
// them as LinearRef slots registered through LinearHost, which rebinds the
// slot when the child is replaced.
#pragma once

#include <torch/nn/module.h>
#include <torch/nn/modules/linear.h>

#include <map>
#include <memory>
#include <string>

namespace qlora::nn {

class LoRALayerImpl;

// A callable handle on a Linear-like child: torch::nn::Linear, LoRALinear or
// QLoRALinear.
class LinearRef {
 public:
  at::Tensor operator()(const at::Tensor& x) const;
  const std::shared_ptr<torch::nn::Module>& module() const { return module_; }
  // The bound plain Linear, or nullptr when a LoRA layer is bound.
  torch::nn::LinearImpl* plain_linear() const { return linear_; }
  void bind(std::shared_ptr<torch::nn::Module> module);

 private:
  std::shared_ptr<torch::nn::Module> module_;
  torch::nn::LinearImpl* linear_ = nullptr;
  LoRALayerImpl* lora_ = nullptr;
};

class LinearHost : public torch::nn::Module {
 public:
  using torch::nn::Module::Module;
  // Replaces child `name` (registry and slot) with `module`.
  void replace_linear(const std::string& name, std::shared_ptr<torch::nn::Module> module);
  bool has_linear_slot(const std::string& name) const { return slots_.count(name) != 0; }

 protected:
  // Registers `module` as child `name` and binds `slot` to it; `slot` must
  // be a member of this module (it is updated in place on replacement).
  void register_linear(const std::string& name, std::shared_ptr<torch::nn::Module> module,
                       LinearRef& slot);

 private:
  std::map<std::string, LinearRef*> slots_;
};

}  // namespace qlora::nn
