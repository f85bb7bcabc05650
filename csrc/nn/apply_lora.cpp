#include "qlora/nn/apply_lora.h"

#include <torch/nn/modules/linear.h>

#include <functional>

#include "qlora/nn/linear_host.h"
#include "qlora/nn/lora_linear.h"
#include "qlora/nn/qlora_linear.h"

namespace qlora::nn {

namespace {

std::string join(const std::string& prefix, const std::string& name) {
  return prefix.empty() ? name : prefix + "." + name;
}

std::shared_ptr<torch::nn::Module> make_lora_layer(const torch::nn::LinearImpl& linear,
                                                   const LoRAConfig& config,
                                                   const std::optional<QuantizedBaseConfig>& base) {
  std::optional<at::Tensor> bias;
  if (linear.bias.defined()) bias = linear.bias.detach();
  if (base) return std::make_shared<QLoRALinearImpl>(linear.weight.detach(), bias, config, *base);
  return std::make_shared<LoRALinearImpl>(linear.weight.detach(), bias, config);
}

// Visits every (parent, child name, dotted path) below `module`.
void walk(torch::nn::Module& module, const std::string& prefix,
          const std::function<void(torch::nn::Module&, const std::string&,
                                   const std::shared_ptr<torch::nn::Module>&, const std::string&)>&
              visit) {
  for (const auto& item : module.named_children()) {
    const std::string path = join(prefix, item.key());
    visit(module, item.key(), item.value(), path);
    walk(*item.value(), path, visit);
  }
}

void freeze_all_but_adapters(torch::nn::Module& root, const LoRAConfig& config) {
  for (auto& p : root.named_parameters()) {
    const std::string& name = p.key();
    const std::string leaf = name.substr(name.rfind('.') + 1);
    const bool adapter = leaf == "lora_A" || leaf == "lora_B" || leaf == "lora_magnitude_vector";
    const bool trained_bias = leaf == "bias" && config.bias == "all";
    p.value().requires_grad_(adapter || trained_bias);
  }
  // "lora_only": the LoRA layers registered their bias as a parameter.
  if (config.bias == "lora_only")
    for (auto& [name, layer] : lora_layers(root))
      for (auto& p : layer->named_parameters(false))
        if (p.key() == "bias") p.value().requires_grad_(true);
}

}  // namespace

std::vector<std::pair<std::string, std::shared_ptr<LoRALayerImpl>>> lora_layers(
    torch::nn::Module& root) {
  std::vector<std::pair<std::string, std::shared_ptr<LoRALayerImpl>>> out;
  walk(root, "", [&](torch::nn::Module&, const std::string&, const auto& child, const auto& path) {
    if (auto layer = std::dynamic_pointer_cast<LoRALayerImpl>(child)) out.emplace_back(path, layer);
  });
  return out;
}

LoRAReport apply_lora(torch::nn::Module& root, const LoRAConfig& config,
                      const std::optional<QuantizedBaseConfig>& base) {
  config.validate();
  std::vector<std::string> linears;
  struct Target {
    torch::nn::Module* parent;
    std::string name, path;
    std::shared_ptr<torch::nn::LinearImpl> linear;
  };
  std::vector<Target> targets;
  walk(root, "",
       [&](torch::nn::Module& parent, const std::string& name, const auto& child,
           const std::string& path) {
         auto linear = std::dynamic_pointer_cast<torch::nn::LinearImpl>(child);
         if (!linear) return;
         linears.push_back(path);
         if (config.matches(path)) targets.push_back({&parent, name, path, linear});
       });
  if (targets.empty()) {
    std::string have;
    for (const auto& l : linears) have += (have.empty() ? "" : ", ") + l;
    TORCH_CHECK(false, "apply_lora: no module matches the LoRA targets (target_modules=",
                c10::ArrayRef<std::string>(config.target_modules),
                config.target_regex.empty() ? "" : ", regex=" + config.target_regex,
                "); Linear modules in the model: ", have.empty() ? "none" : have);
  }
  LoRAReport report;
  for (const Target& t : targets) {
    auto* host = dynamic_cast<LinearHost*>(t.parent);
    TORCH_CHECK(host && host->has_linear_slot(t.name), "apply_lora: \"", t.path,
                "\" is a torch::nn::Linear held by ", t.parent->name(),
                ", which is not a qlora::nn::LinearHost slot, so its forward() would keep "
                "calling the old layer; register it with LinearHost::register_linear");
    host->replace_linear(t.name, make_lora_layer(*t.linear, config, base));
    report.replaced.push_back(t.path);
  }
  freeze_all_but_adapters(root, config);
  for (const auto& p : root.parameters()) {
    report.total_parameters += p.numel();
    if (p.requires_grad()) report.trainable_parameters += p.numel();
    report.memory_bytes += p.numel() * p.element_size();
  }
  for (const auto& b : root.buffers()) report.memory_bytes += b.numel() * b.element_size();
  return report;
}

std::ostream& operator<<(std::ostream& os, const LoRAReport& report) {
  os << "LoRA on " << report.replaced.size() << " modules; trainable parameters "
     << report.trainable_parameters << " of " << report.total_parameters << " ("
     << (report.total_parameters ? 100.0 * report.trainable_parameters / report.total_parameters
                                 : 0)
     << "%); " << report.memory_bytes << " bytes";
  return os;
}

}  // namespace qlora::nn
