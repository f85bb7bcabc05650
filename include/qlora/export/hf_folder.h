// Writing a loaded model back out as a Hugging Face folder.
#pragma once

#include <string>

#include "qlora/models/llama.h"
#include "qlora/quant_state.h"

namespace qlora::exporters {

using models::LlamaForCausalLM;

// A bitsandbytes 4-bit HF folder (config.json with quantization_config +
// model.safetensors) from a model whose Linear layers are QLoRALinear:
// the 4-bit layers are written in bitsandbytes' key layout, everything
// else densely; LoRA adapters are not included (save them with
// nn::save_peft_adapter). transformers and load_llama read the result.
void save_bnb_4bit_folder(LlamaForCausalLM& model, const std::string& dir, const QuantConfig& quant,
                          at::ScalarType compute_dtype);

// A plain Hugging Face folder (config.json + model.safetensors) with every
// LoRA layer merged into its weight: merged = dequant(W) + scaling * B A (or
// the DoRA rows), never the pre-quantisation weight. Tokenizer files are
// copied from `tokenizer_source` when it is a folder that has them.
void save_hf_merged_folder(LlamaForCausalLM& model, const std::string& dir, at::ScalarType dtype,
                           const std::string& tokenizer_source);

// Copies the tokenizer files of an HF folder (tokenizer.json, ...) into dir;
// returns how many it found.
int copy_tokenizer_files(const std::string& from_dir, const std::string& to_dir);

}  // namespace qlora::exporters
