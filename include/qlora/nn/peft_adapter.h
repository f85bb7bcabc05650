// Adapters in PEFT's on-disk layout: adapter_model.safetensors with keys
// base_model.model.<module path>.lora_A.weight / .lora_B.weight
// (/ .lora_magnitude_vector for DoRA, / .bias when biases train) and
// adapter_config.json, so PEFT loads what we save and we load what PEFT saves.
#pragma once

#include <torch/nn/module.h>

#include <map>
#include <string>

#include "qlora/nn/lora_config.h"

namespace qlora::nn {

struct AdapterMetadata {
  std::string base_model_name_or_path;
  std::string task_type = "CAUSAL_LM";
};

// The adapter tensors of `model` under PEFT's key names (float32, CPU).
std::map<std::string, at::Tensor> peft_state_dict(torch::nn::Module& model);

// Writes dir/adapter_model.safetensors and dir/adapter_config.json (each
// atomically; dir is created if missing).
void save_peft_adapter(const std::string& dir, torch::nn::Module& model, const LoRAConfig& config,
                       const AdapterMetadata& meta = {});

// Reads dir/adapter_config.json; errors name the file and key.
LoRAConfig read_peft_adapter_config(const std::string& dir, AdapterMetadata* meta = nullptr);

// Copies the adapter in dir into the LoRA layers of `model` (built with the
// same config). Every key must name an existing LoRA tensor of the same
// shape and every LoRA tensor must be present; otherwise an error lists
// exactly what does not fit.
void load_peft_adapter(const std::string& dir, torch::nn::Module& model);

}  // namespace qlora::nn
