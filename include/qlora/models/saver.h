// Writing a loaded model back out as a Hugging Face folder.
#pragma once

#include <string>

#include "qlora/models/llama.h"
#include "qlora/quant_state.h"

namespace qlora::models {

// A bitsandbytes 4-bit HF folder (config.json with quantization_config +
// model.safetensors) from a model whose Linear layers are QLoRALinear:
// the 4-bit layers are written in bitsandbytes' key layout, everything
// else densely; LoRA adapters are not included (save them with
// nn::save_peft_adapter). transformers and load_llama read the result.
void save_bnb_4bit_folder(LlamaForCausalLM& model, const std::string& dir, const QuantConfig& quant,
                          at::ScalarType compute_dtype);

}  // namespace qlora::models
