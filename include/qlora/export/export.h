// One entry for every way a fine-tune leaves the program: the PEFT adapter,
// a merged Hugging Face folder, a merged GGUF model, a GGUF LoRA adapter
// and the QNAT container. Each format's own function sits beside this one
// in include/qlora/export/ (gguf_model.h, hf_folder.h, torchscript.h) or
// with the format it binds (nn/peft_adapter.h, models/qnat.h).
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "qlora/models/llama.h"
#include "qlora/nn/lora_config.h"

namespace qlora::exporters {

enum class Format {
  kPeft,         // adapter_model.safetensors + adapter_config.json (a folder)
  kHfFolder,     // merged weights + config.json + tokenizer files (a folder)
  kGgufMerged,   // the merged model as one GGUF file for llama.cpp
  kGgufAdapter,  // the LoRA adapter as a GGUF file (llama.cpp --lora)
  kQnat,         // our lossless NF4 container (docs/QNAT.md)
};

// "peft", "hf", "gguf", "gguf-adapter", "qnat".
std::optional<Format> parse_format(std::string_view name);
std::string_view format_name(Format format);
std::vector<std::string> format_names();

struct Request {
  Format format = Format::kPeft;
  std::string out;  // the folder or file to write
  // hf: f32 | f16 | bf16; gguf: also q8_0 | q4_0. Other formats ignore it.
  std::string outtype = "f16";
};

// What is exported: the model with its LoRA layers and where it came from.
struct Source {
  models::LlamaForCausalLM& model;
  const nn::LoRAConfig& lora;
  std::string base_model;        // recorded as base_model_name_or_path
  std::string tokenizer_source;  // a model folder or GGUF file holding the tokenizer
};

// Writes `request.out`; errors name the format and what is wrong.
void export_model(const Source& source, const Request& request);

}  // namespace qlora::exporters
