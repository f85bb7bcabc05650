// The one JSON form of nn::LoRAConfig: PEFT's adapter_config.json keys
// (r, lora_alpha, lora_dropout, target_modules as a list, "all-linear" or a
// regex string, exclude_modules, use_rslora, use_dora, bias). The PEFT
// adapter files and the QNAT container's metadata both use it.
#pragma once

#include <nlohmann/json.hpp>

#include <string>

#include "qlora/nn/lora_config.h"

namespace qlora::nn::detail {

nlohmann::json lora_config_to_json(const LoRAConfig& config);

// Missing keys take PEFT's defaults; a key of the wrong type is an error
// naming `source` (the file) and the key. The result is validated.
LoRAConfig lora_config_from_json(const nlohmann::json& j, const std::string& source);

}  // namespace qlora::nn::detail
