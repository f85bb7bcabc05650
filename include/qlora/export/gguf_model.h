// Export of a LlamaForCausalLM to GGUF files llama.cpp loads: the whole
// model with every LoRA adapter merged in (export_gguf_merged), or the LoRA
// adapters alone as a llama.cpp LoRA adapter (export_gguf_adapter).
//
// Merged weights are LoRALayerImpl::merged_weight(): the adapter folded into
// the weight it was trained against (for QLoRA, dequant(W), never the
// original weight). Q/K rows are permuted as llama.cpp's convert script does
// (models::apply_llama_qk_permutation). Norms and other 1-D tensors are F32;
// matrices (token_embd included) take the requested type.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "qlora/models/llama.h"

namespace qlora::models {

// The GGUF tensor name of a Hugging Face LLaMA parameter:
// "model.layers.3.self_attn.q_proj.weight" -> "blk.3.attn_q.weight",
// "model.embed_tokens.weight" -> "token_embd.weight", "lm_head.weight" ->
// "output.weight", .... Throws io::GgufError for names llama.cpp's llama
// architecture has no tensor for.
std::string gguf_tensor_name(const std::string& hf_name);

// The model's float32 CPU weights under their Hugging Face names, in
// llama.cpp's tensor order, with every LoRA layer merged (merged_weight) and
// no Q/K permutation. lm_head.weight is left out when the head is tied to
// the embedding and carries no adapter.
std::vector<std::pair<std::string, at::Tensor>> merged_hf_weights(LlamaForCausalLM& model);

// Writes `out_path` (atomically): general.* and llama.* metadata with the
// types llama.cpp's loader requires, the tokenizer and every weight, merged.
//   tokenizer_source  a .gguf file (its tokenizer.ggml.* keys and
//                     tokenizer.chat_template are copied with their exact
//                     types), or a folder holding a SentencePiece
//                     tokenizer.model (written as tokenizer.ggml.model "llama":
//                     pieces, scores, types) or else tokenizer.json (a byte-level
//                     BPE, written as "gpt2" with tokenizer.ggml.pre naming its
//                     pre-tokenizer; ids from tokenizer_config.json when present).
//   outtype           "f32", "f16", "bf16", "q8_0" or "q4_0" for every matrix, or one of
//                     llama-quantize's K-quant mixes "q4_k_s", "q4_k_m" ("q4_k"),
//                     "q5_k_s", "q5_k_m" ("q5_k"), "q6_k": each tensor gets the type
//                     and the bytes llama-quantize gives it from an F32 export.
// Throws io::GgufError for models llama.cpp's "llama" architecture cannot
// express (Qwen2 or other q/k/v/o or MLP biases, activations other than
// SiLU, rope scaling other than linear / llama3), unsupported outtypes,
// tokenizer sources that are neither, and quantised types whose row length
// is not a multiple of 32 (naming the tensor).
void export_gguf_merged(LlamaForCausalLM& model, const std::string& tokenizer_source,
                        const std::string& out_path, const std::string& outtype);

// Writes the model's LoRA adapters as a llama.cpp LoRA adapter GGUF:
// general.type "adapter", adapter.type "lora", general.architecture "llama",
// adapter.lora.alpha (FLOAT32) = scaling * r of the first layer, so that
// llama.cpp's alpha / r is our scaling (rsLoRA included); a layer whose own
// scaling differs has its B rescaled to match. Tensors
// "<base>.lora_a" (lora_A [r, in], ne [in, r]) and "<base>.lora_b" (lora_B
// [out, r], ne [r, out]) in F32, B's rows Q/K-permuted for attn_q / attn_k.
// Throws io::GgufError when the model has no LoRA layers, for DoRA layers
// (naming the layer; llama.cpp has no DoRA) and for layers llama.cpp has no
// tensor for.
void export_gguf_adapter(LlamaForCausalLM& model, const std::string& out_path);

}  // namespace qlora::models
