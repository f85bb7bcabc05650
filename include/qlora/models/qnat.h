// A LlamaForCausalLM in a QNAT file (the container: io/qnat_file.h): the
// 4-bit bases exactly as stored, with their quantisation state, and
// optionally the LoRA adapter.
//
// save_qnat writes what the model holds, bit for bit (packed NF4/FP4 bytes,
// uint8 absmax and nested state when double-quantised, quant maps, dense
// parameters, LoRA A/B/magnitude); load_qnat rebuilds the same model without
// re-quantising anything. The metadata keys are in docs/QNAT.md.
#pragma once

#include <c10/core/Device.h>

#include <optional>
#include <string>

#include "qlora/io/qnat_file.h"
#include "qlora/models/llama.h"
#include "qlora/nn/lora_config.h"

namespace qlora::models {

// What save_qnat records besides the model itself.
struct QnatMetadata {
  // Where the tokenizer comes from (a tokenizer.json / .model / .gguf path or
  // a Hugging Face folder) and, optionally, its kind ("hf-json",
  // "sentencepiece", "gguf"): informative, stored as given.
  std::string tokenizer_source;
  std::string tokenizer_kind;
  // The adapter's configuration as trained (target rules included); each
  // LoRA layer's own r/alpha/... are always recorded per layer.
  std::optional<nn::LoRAConfig> lora;
  // The quantisation the bases were made with (informative: every 4-bit
  // layer records its own quantisation state).
  std::optional<nn::QuantizedBaseConfig> quantization;
  // false: leave LoRA tensors out (flag bit 0 clear); load_qnat then gives
  // every LoRA layer a fresh no-op adapter (B = 0).
  bool include_adapter = true;
  // A JSON object stored verbatim under "extra" ("" = none).
  std::string extra_json;
};

// Writes `model` to `path` atomically. Tensors on any device are copied to
// the CPU; the model is not modified.
void save_qnat(const std::string& path, LlamaForCausalLMImpl& model,
               const QnatMetadata& metadata = {});
inline void save_qnat(const std::string& path, LlamaForCausalLM& model,
                      const QnatMetadata& metadata = {}) {
  save_qnat(path, *model, metadata);
}

// The model config in the file's metadata ("model_config").
LlamaConfig qnat_model_config(const io::QnatFile& file);

struct QnatLoadOptions {
  c10::Device device = c10::kCPU;
  // true: frozen tensors (4-bit bases, dense frozen weights) stay zero-copy
  // views of the (private, copy-on-write) mapping; trainable parameters are
  // always copied. false: everything is copied into fresh memory.
  bool zero_copy = true;
  bool verify_checksums = true;
};

// Builds the model `path` holds: QLoRALinear layers from the packed weights
// and their QuantState (never re-quantised), LoRALinear / plain Linear layers
// as saved, LoRA weights restored when the file has an adapter, requires_grad
// as saved. Returns it in eval mode. Errors (io::QnatError) name the file and
// the tensor.
LlamaForCausalLM load_qnat(const std::string& path, const QnatLoadOptions& options = {},
                           QnatMetadata* metadata = nullptr);

}  // namespace qlora::models
