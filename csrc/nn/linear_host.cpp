#include "qlora/nn/linear_host.h"

#include "qlora/nn/lora_layer.h"

namespace qlora::nn {

void LinearRef::bind(std::shared_ptr<torch::nn::Module> module) {
  linear_ = dynamic_cast<torch::nn::LinearImpl*>(module.get());
  lora_ = dynamic_cast<LoRALayerImpl*>(module.get());
  TORCH_CHECK(linear_ || lora_, "LinearRef: ", module ? module->name() : "null",
              " is neither a torch::nn::Linear nor a qlora LoRA layer");
  module_ = std::move(module);
}

at::Tensor LinearRef::operator()(const at::Tensor& x) const {
  TORCH_CHECK(module_, "LinearRef: called before a module was bound");
  return lora_ ? lora_->forward(x) : linear_->forward(x);
}

void LinearHost::register_linear(const std::string& name, std::shared_ptr<torch::nn::Module> module,
                                 LinearRef& slot) {
  slot.bind(register_module(name, module));
  slots_[name] = &slot;
}

void LinearHost::replace_linear(const std::string& name,
                                std::shared_ptr<torch::nn::Module> module) {
  auto it = slots_.find(name);
  TORCH_CHECK(it != slots_.end(), Module::name(), " has no Linear slot \"", name, "\"");
  it->second->bind(replace_module(name, module));
}

}  // namespace qlora::nn
