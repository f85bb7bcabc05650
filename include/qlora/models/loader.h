// Loading a LlamaForCausalLM from
//   - a Hugging Face folder: config.json + model.safetensors or a sharded
//     model.safetensors.index.json;
//   - a bitsandbytes 4-bit folder (config.json "quantization_config" with
//     quant_method "bitsandbytes", load_in_4bit): the packed NF4/FP4 weights
//     go straight into QLoRALinear layers, never dequantised;
//   - a GGUF file (llama architecture): ggml tensors dequantised, the
//     llama.cpp Q/K row permutation undone; or, with `gguf_native`, the
//     Linear weights kept in their ggml blocks.
//
// Weights stream tensor by tensor while the model is built: safetensors
// tensors are zero-copy views of the mapped file when dtype and device
// already match, and with `quantize` each Linear is quantised as soon as it
// is read, so the whole model never exists in dense form.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "qlora/models/llama.h"
#include "qlora/nn/apply_lora.h"
#include "qlora/nn/lora_config.h"

namespace qlora::models {

struct LoadOptions {
  at::ScalarType dtype = at::kFloat;  // every dense parameter (and dense LoRA bases)
  c10::Device device = at::kCPU;
  // LoRA applied while loading, with apply_lora's rules: the Linear layers
  // `lora` matches become LoRALinear (QLoRALinear with `quantize`), every
  // other parameter is frozen, and the report says what apply_lora would.
  std::optional<nn::LoRAConfig> lora;
  // Quantise Linear layers to 4 bits while loading (never lm_head or the
  // embeddings). With `lora`: its targets. Without: every Linear but
  // lm_head, for 4-bit inference (see "inert adapters" below).
  std::optional<nn::QuantizedBaseConfig> quantize;
  // GGUF sources only: every Linear but lm_head keeps the file's own ggml
  // blocks (nn::GgmlLoRALinear over qlora::ggml_matmul, Q/K rows put back in
  // Hugging Face order), never re-quantised; `quantize` is then unused.
  // LoRA targets train on them, the others get inert adapters (below).
  struct GgufNativeBase {
    at::ScalarType compute_dtype = at::kFloat;  // dtype of the base matmuls
  };
  std::optional<GgufNativeBase> gguf_native;
  // "auto" (a path ending in .gguf is GGUF, a directory is a Hugging Face
  // folder), "hf" or "gguf".
  std::string format = "auto";
};

// Inert adapters: a 4-bit layer is a QLoRALinear, which always has an
// adapter. Layers quantised without being LoRA targets (bitsandbytes layers
// outside `lora`'s targets, or any 4-bit layer when `lora` is not given)
// get an r = 1 adapter with B = 0, frozen: they compute exactly their 4-bit
// base. They are listed in LoadReport::inert_adapters, not in lora->replaced.
struct LoadReport {
  std::string format;  // "safetensors", "bnb-4bit" or "gguf"
  std::string config_source;
  LlamaConfig config;
  std::vector<std::string> quantized;  // dotted names of the 4-bit (or ggml-block) Linear layers
  std::vector<std::string> inert_adapters;  // 4-bit layers with a frozen no-op adapter
  std::optional<nn::LoRAReport> lora;       // when LoadOptions::lora is set
};

// Loads `path` (see the top of this file). Returns the model in eval mode.
// Errors (c10::Error) name the file and the tensor or key: a missing or
// unexpected tensor, a shape or dtype mismatch, an unsupported config.
LlamaForCausalLM load_llama(const std::string& path, const LoadOptions& options = {},
                            LoadReport* report = nullptr);

// "gguf", "bnb-4bit" or "safetensors" for what load_llama would read at
// `path`; throws naming what is missing.
std::string detect_llama_format(const std::string& path, const std::string& format = "auto");

}  // namespace qlora::models
