// The architecture of a LLaMA-family causal LM, read from a Hugging Face
// config.json (transformers 4.x "rope_scaling" or 5.x "rope_parameters"
// layout) or from the llama.* keys of a GGUF file.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace qlora::io {
class GgufReader;
}

namespace qlora::models {

// RoPE frequency scaling, as transformers' ROPE_INIT_FUNCTIONS compute it.
struct RopeScaling {
  std::string type = "default";  // "default" | "linear" | "llama3"
  double factor = 1.0;           // linear, llama3
  double low_freq_factor = 1.0;  // llama3
  double high_freq_factor = 4.0;
  // llama3; 0 means max_position_embeddings (as transformers defaults it).
  int64_t original_max_position_embeddings = 0;
};

struct LlamaConfig {
  // "llama", or "qwen2": Qwen2 always has q/k/v biases and never an o_proj
  // or MLP bias, whatever attention_bias says (transformers' Qwen2Attention).
  std::string model_type = "llama";
  int64_t vocab_size = 32000;
  int64_t hidden_size = 4096;
  int64_t intermediate_size = 11008;
  int64_t num_hidden_layers = 32;
  int64_t num_attention_heads = 32;
  int64_t num_key_value_heads = 32;  // < num_attention_heads: grouped-query attention
  int64_t head_dim = 0;              // 0: hidden_size / num_attention_heads
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  // Per-frequency divisors of inv_freq (GGUF "rope_freqs.weight", which
  // llama.cpp's converter writes for llama3 scaling); empty when unused.
  std::vector<float> rope_freq_factors;
  bool attention_bias = false;  // llama: q/k/v/o biases
  bool mlp_bias = false;        // llama: gate/up/down biases
  double attention_dropout = 0.0;
  std::string hidden_act = "silu";
  bool tie_word_embeddings = false;
  int64_t max_position_embeddings = 2048;
  double initializer_range = 0.02;  // std of the random init (transformers' _init_weights)
  std::optional<int64_t> bos_token_id = 1;
  std::vector<int64_t> eos_token_ids = {2};  // config.json's eos_token_id: int or list
  std::optional<int64_t> pad_token_id;
  at::ScalarType torch_dtype = at::kFloat;  // "dtype" (5.x) / "torch_dtype" (4.x)

  int64_t attention_head_dim() const {
    return head_dim > 0 ? head_dim : hidden_size / num_attention_heads;
  }
  bool qkv_bias() const { return model_type == "qwen2" || attention_bias; }
  bool o_proj_bias() const { return model_type != "qwen2" && attention_bias; }
  bool has_mlp_bias() const { return model_type != "qwen2" && mlp_bias; }

  // Throws c10::Error naming the offending field(s).
  void validate() const;
  // RoPE inverse frequencies, float32 [head_dim / 2] on the CPU, computed
  // with the same tensor ops (and so the same float32 roundings) as
  // transformers' default / linear / llama3 rope init.
  at::Tensor rope_inv_freq() const;

  // `source` names the document in error messages.
  static LlamaConfig from_json(const std::string& json_text, const std::string& source);
  static LlamaConfig from_json_file(const std::string& path);
  // From general.architecture "llama" and its llama.* keys (the shapes of
  // token_embd / output decide vocab_size when llama.vocab_size is absent,
  // and tie_word_embeddings).
  static LlamaConfig from_gguf(const io::GgufReader& reader);
  // A config.json transformers 5 reads back to the same model.
  std::string to_json() const;
};

}  // namespace qlora::models
