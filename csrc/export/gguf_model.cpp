#include "qlora/export/gguf_model.h"

#include <ATen/ops/tensor.h>
#include <torch/nn/modules/linear.h>

#include <cmath>
#include <fstream>
#include <map>
#include <optional>

#include "export/gguf_quant_mix.h"
#include "qlora/io/gguf.h"
#include "qlora/io/gguf_writer.h"
#include "qlora/models/gguf_qk_permutation.h"
#include "qlora/nn/apply_lora.h"
#include "qlora/nn/lora_layer.h"
#include "qlora/tokenizers/tokenizer.h"
#include "tokenizers/tokenizer_json.h"
#include "util/strings.h"

namespace qlora::models {

namespace {

using io::GgmlType;
using io::GgufError;
using util::ends_with;

const std::map<std::string, std::string>& layer_suffixes() {
  static const std::map<std::string, std::string> m = {
      {"input_layernorm.weight", "attn_norm.weight"},
      {"self_attn.q_proj.weight", "attn_q.weight"},
      {"self_attn.k_proj.weight", "attn_k.weight"},
      {"self_attn.v_proj.weight", "attn_v.weight"},
      {"self_attn.o_proj.weight", "attn_output.weight"},
      {"post_attention_layernorm.weight", "ffn_norm.weight"},
      {"mlp.gate_proj.weight", "ffn_gate.weight"},
      {"mlp.up_proj.weight", "ffn_up.weight"},
      {"mlp.down_proj.weight", "ffn_down.weight"},
  };
  return m;
}

// Refuses what llama.cpp's "llama" architecture cannot express.
void check_exportable(const LlamaConfig& c) {
  if (c.model_type != "llama" || c.qkv_bias() || c.o_proj_bias() || c.has_mlp_bias()) {
    throw GgufError("GGUF export: model_type '" + c.model_type + "'" +
                    (c.qkv_bias() || c.o_proj_bias() ? " with attention biases" : "") +
                    (c.has_mlp_bias() ? " with MLP biases" : "") +
                    " cannot be exported as llama.cpp's 'llama' architecture (it has no q/k/v/o or "
                    "MLP biases); only bias-free LLaMA models are supported");
  }
  if (c.hidden_act != "silu") {
    throw GgufError("GGUF export: hidden_act '" + c.hidden_act +
                    "' is not supported by llama.cpp's 'llama' architecture (SiLU only)");
  }
  if (c.rope_scaling.type != "default" && c.rope_scaling.type != "linear" &&
      c.rope_scaling.type != "llama3") {
    throw GgufError("GGUF export: rope_scaling type '" + c.rope_scaling.type +
                    "' is not supported");
  }
}

// The weight of the Linear (or LoRA layer, merged) at dotted `path`.
at::Tensor linear_weight(torch::nn::Module& root, const std::string& path) {
  for (const auto& item : root.named_modules("", false)) {
    if (item.key() != path) continue;
    const std::shared_ptr<torch::nn::Module>& m = item.value();
    if (auto lora = std::dynamic_pointer_cast<nn::LoRALayerImpl>(m)) {
      if (lora->base_bias().has_value()) {
        throw GgufError("GGUF export: " + path +
                        " has a bias; llama.cpp's 'llama' architecture "
                        "has none");
      }
      return lora->merged_weight(at::kFloat).detach().to(at::kCPU, at::kFloat).contiguous();
    }
    if (auto lin = std::dynamic_pointer_cast<torch::nn::LinearImpl>(m)) {
      if (lin->bias.defined()) {
        throw GgufError("GGUF export: " + path +
                        " has a bias; llama.cpp's 'llama' architecture "
                        "has none");
      }
      return lin->weight.detach().to(at::kCPU, at::kFloat).contiguous();
    }
    throw GgufError("GGUF export: " + path + " is neither a Linear nor a LoRA layer");
  }
  throw GgufError("GGUF export: the model has no module " + path);
}

at::Tensor parameter(torch::nn::Module& root, const std::string& name) {
  if (const at::Tensor* p = root.named_parameters(true).find(name)) {
    return p->detach().to(at::kCPU, at::kFloat).contiguous();
  }
  if (const at::Tensor* b = root.named_buffers(true).find(name)) {
    return b->detach().to(at::kCPU, at::kFloat).contiguous();
  }
  throw GgufError("GGUF export: the model has no parameter " + name);
}

bool is_lora(torch::nn::Module& root, const std::string& path) {
  for (const auto& item : root.named_modules("", false)) {
    if (item.key() == path) {
      return std::dynamic_pointer_cast<nn::LoRALayerImpl>(item.value()) != nullptr;
    }
  }
  return false;
}

// A plain type for every matrix, or one of llama-quantize's K-quant mixes
// (a type per tensor, export/gguf_quant_mix.h).
struct OutType {
  GgmlType matrix = GgmlType::F32;
  std::optional<exporters::detail::KQuantMix> mix;
  uint32_t file_type = 0;  // general.file_type: llama.cpp's llama_ftype
};

OutType parse_outtype(const std::string& outtype) {
  if (outtype == "f32") return {GgmlType::F32, std::nullopt, 0};
  if (outtype == "f16") return {GgmlType::F16, std::nullopt, 1};
  if (outtype == "q4_0") return {GgmlType::Q4_0, std::nullopt, 2};
  if (outtype == "q8_0") return {GgmlType::Q8_0, std::nullopt, 7};
  if (outtype == "bf16") return {GgmlType::BF16, std::nullopt, 32};
  if (const auto mix = exporters::detail::parse_kquant_mix(outtype))
    return {GgmlType::F32, mix, exporters::detail::file_type_of(*mix)};
  throw GgufError("GGUF export: unknown outtype '" + outtype +
                  "' (expected f32, f16, bf16, q8_0, q4_0, q4_k_s, q4_k_m (q4_k), q5_k_s, "
                  "q5_k_m (q5_k) or q6_k)");
}

bool file_exists(const std::string& path) { return std::ifstream(path).good(); }

void add_tokenizer_from_gguf(io::GgufWriter& w, const std::string& path, int64_t vocab_size) {
  const io::GgufReader r = io::GgufReader::open(path);
  if (!r.has("tokenizer.ggml.tokens")) {
    throw GgufError("GGUF export: " + path + " has no tokenizer.ggml.tokens");
  }
  const int64_t n = static_cast<int64_t>(r.get("tokenizer.ggml.tokens").size());
  if (n != vocab_size) {
    throw GgufError("GGUF export: " + path + " has " + std::to_string(n) +
                    " tokens but the model's vocab_size is " + std::to_string(vocab_size));
  }
  for (const std::string& key : r.keys()) {
    if (key.rfind("tokenizer.ggml.", 0) == 0 || key == "tokenizer.chat_template") {
      w.add_value(r.get(key));
    }
  }
}

// tokenizer.json (and tokenizer_config.json beside it) as read by the tokenizers.
void add_tokenizer_from_json(io::GgufWriter& w, const std::string& dir, const LlamaConfig& config) {
  const std::string tok_path = dir + "/tokenizer.json";
  const tokenizers::TokenizerJsonVocab tok = tokenizers::read_tokenizer_json_vocab(tok_path);
  if (tok.model_type != "BPE") {
    throw GgufError("GGUF export: " + tok_path + ": model type '" + tok.model_type +
                    "' is not supported (byte-level BPE only)");
  }
  const int64_t n = tok.tokens.empty() ? 0 : int64_t{tok.tokens.rbegin()->first} + 1;
  if (n > config.vocab_size) {
    throw GgufError("GGUF export: " + tok_path + " has ids up to " + std::to_string(n - 1) +
                    " but the model's vocab_size is " + std::to_string(config.vocab_size));
  }
  std::vector<std::string> tokens(static_cast<size_t>(config.vocab_size));
  std::vector<int32_t> types(static_cast<size_t>(config.vocab_size), 5);  // UNUSED padding
  for (int64_t i = 0; i < config.vocab_size; ++i) {
    auto it = tok.tokens.find(static_cast<int32_t>(i));
    if (it == tok.tokens.end()) {
      tokens[i] = "[PAD" + std::to_string(i) + "]";
      continue;
    }
    tokens[i] = it->second;
    auto s = tok.added_special.find(static_cast<int32_t>(i));
    types[i] = (s != tok.added_special.end() && s->second) ? 3 : 1;
  }
  std::vector<std::string> merges;
  merges.reserve(tok.merges.size());
  for (const auto& [left, right] : tok.merges) merges.push_back(left + " " + right);

  w.add_string("tokenizer.ggml.model", "gpt2");
  w.add_string("tokenizer.ggml.pre", tok.ggml_pre);
  w.add_string_array("tokenizer.ggml.tokens", tokens);
  w.add_i32_array("tokenizer.ggml.token_type", types);
  w.add_string_array("tokenizer.ggml.merges", merges);

  // tokenizer_config.json's token, else config.json's id.
  const auto id_or = [](std::optional<int32_t> id,
                        std::optional<int64_t> fallback) -> std::optional<int64_t> {
    if (id) return *id;
    return fallback;
  };
  const auto put_id = [&](const char* key, std::optional<int64_t> id) {
    if (id && *id >= 0 && *id < config.vocab_size) w.add_u32(key, static_cast<uint32_t>(*id));
  };
  put_id("tokenizer.ggml.bos_token_id", id_or(tok.bos_id, config.bos_token_id));
  put_id("tokenizer.ggml.eos_token_id",
         id_or(tok.eos_id, config.eos_token_ids.empty()
                               ? std::nullopt
                               : std::optional<int64_t>(config.eos_token_ids[0])));
  put_id("tokenizer.ggml.unknown_token_id", id_or(tok.unk_id, std::nullopt));
  put_id("tokenizer.ggml.padding_token_id", id_or(tok.pad_id, config.pad_token_id));

  w.add_bool("tokenizer.ggml.add_bos_token", tok.add_bos);
  if (tok.add_eos) w.add_bool("tokenizer.ggml.add_eos_token", *tok.add_eos);
  if (tok.chat_template) w.add_string("tokenizer.chat_template", *tok.chat_template);
}

// A SentencePiece tokenizer.model as llama.cpp's "llama" vocabulary (what its converter
// writes for Llama 2 / Mistral): pieces, scores and types, padded to the model's vocab_size
// with unused pieces.
void add_tokenizer_from_sentencepiece(io::GgufWriter& w, const std::string& model_path,
                                      const LlamaConfig& config) {
  const tokenizers::VocabSpec v = tokenizers::sentencepiece_vocab(model_path);
  const auto n = static_cast<int64_t>(v.tokens.size());
  if (n > config.vocab_size) {
    throw GgufError("GGUF export: " + model_path + " has " + std::to_string(n) +
                    " pieces but the model's vocab_size is " + std::to_string(config.vocab_size));
  }
  std::vector<std::string> tokens = v.tokens;
  std::vector<float> scores = v.scores;
  std::vector<int32_t> types = v.token_types;
  for (int64_t i = n; i < config.vocab_size; ++i) {
    tokens.push_back("[PAD" + std::to_string(i) + "]");
    scores.push_back(-1000.0f);
    types.push_back(5);  // UNUSED
  }
  w.add_string("tokenizer.ggml.model", "llama");
  w.add_string("tokenizer.ggml.pre", "default");
  w.add_string_array("tokenizer.ggml.tokens", tokens);
  w.add_f32_array("tokenizer.ggml.scores", scores);
  w.add_i32_array("tokenizer.ggml.token_type", types);
  const auto put_id = [&](const char* key, std::optional<int32_t> id) {
    if (id) w.add_u32(key, static_cast<uint32_t>(*id));
  };
  put_id("tokenizer.ggml.bos_token_id", v.bos_id);
  put_id("tokenizer.ggml.eos_token_id", v.eos_id);
  put_id("tokenizer.ggml.unknown_token_id", v.unk_id);
  put_id("tokenizer.ggml.padding_token_id", v.pad_id);
  w.add_bool("tokenizer.ggml.add_bos_token", v.add_bos);
  w.add_bool("tokenizer.ggml.add_eos_token", v.add_eos);
  w.add_bool("tokenizer.ggml.add_space_prefix", v.add_space_prefix);
}

// llama3 rope scaling as llama.cpp's rope_freqs.weight: default inv_freq /
// scaled inv_freq, per rotary pair.
std::optional<at::Tensor> rope_freq_factors(const LlamaConfig& c) {
  if (!c.rope_freq_factors.empty()) {
    return at::tensor(c.rope_freq_factors, at::TensorOptions().dtype(at::kFloat));
  }
  if (c.rope_scaling.type != "llama3") return std::nullopt;
  const at::Tensor scaled = c.rope_inv_freq().to(at::kCPU, at::kDouble);
  const int64_t hd = c.attention_head_dim();
  std::vector<double> factors(static_cast<size_t>(hd / 2));
  for (int64_t i = 0; i < hd / 2; ++i) {
    const double base = 1.0 / std::pow(c.rope_theta, static_cast<double>(2 * i) / hd);
    factors[i] = base / scaled[i].item<double>();
  }
  return at::tensor(factors, at::TensorOptions().dtype(at::kDouble)).to(at::kFloat);
}

std::string base_path(const std::string& hf_weight_name) {
  return hf_weight_name.substr(0, hf_weight_name.size() - std::string(".weight").size());
}

}  // namespace

std::string gguf_tensor_name(const std::string& hf) {
  if (hf == "model.embed_tokens.weight") return "token_embd.weight";
  if (hf == "model.norm.weight") return "output_norm.weight";
  if (hf == "lm_head.weight") return "output.weight";
  const std::string prefix = "model.layers.";
  if (hf.rfind(prefix, 0) == 0) {
    const size_t dot = hf.find('.', prefix.size());
    if (dot != std::string::npos && dot > prefix.size()) {
      const std::string layer = hf.substr(prefix.size(), dot - prefix.size());
      const bool digits = layer.find_first_not_of("0123456789") == std::string::npos;
      auto it = layer_suffixes().find(hf.substr(dot + 1));
      if (digits && it != layer_suffixes().end()) return "blk." + layer + "." + it->second;
    }
  }
  throw GgufError("GGUF export: llama.cpp's 'llama' architecture has no tensor for '" + hf + "'");
}

namespace {

// The HF names merged_hf_weights returns, in order.
std::vector<std::string> hf_weight_names(LlamaForCausalLM& model) {
  const LlamaConfig& c = model->config();
  std::vector<std::string> names = {"model.embed_tokens.weight"};
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    for (const char* name :
         {"input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
          "self_attn.v_proj.weight", "self_attn.o_proj.weight", "post_attention_layernorm.weight",
          "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"}) {
      names.push_back(p + name);
    }
  }
  names.push_back("model.norm.weight");
  if (!c.tie_word_embeddings || is_lora(*model, "lm_head")) names.push_back("lm_head.weight");
  return names;
}

// One float32 CPU weight by HF name, merged when it is a LoRA layer.
at::Tensor hf_weight(LlamaForCausalLM& model, const std::string& name) {
  if (ends_with(name, "norm.weight") || name == "model.embed_tokens.weight") {
    return parameter(*model, name);
  }
  return linear_weight(*model, base_path(name));
}

// The shape of hf_weight(model, name), from the config alone: the export
// announces every tensor before computing any.
std::vector<int64_t> hf_weight_shape(const LlamaConfig& c, const std::string& name) {
  const int64_t h = c.hidden_size, I = c.intermediate_size, hd = c.attention_head_dim();
  const int64_t q = c.num_attention_heads * hd, kv = c.num_key_value_heads * hd;
  if (ends_with(name, "norm.weight")) return {h};
  if (name == "model.embed_tokens.weight" || name == "lm_head.weight") return {c.vocab_size, h};
  if (ends_with(name, "q_proj.weight")) return {q, h};
  if (ends_with(name, "k_proj.weight") || ends_with(name, "v_proj.weight")) return {kv, h};
  if (ends_with(name, "o_proj.weight")) return {h, q};
  if (ends_with(name, "down_proj.weight")) return {h, I};
  return {I, h};  // gate_proj, up_proj
}

}  // namespace

std::vector<std::pair<std::string, at::Tensor>> merged_hf_weights(LlamaForCausalLM& model) {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (const std::string& name : hf_weight_names(model)) {
    out.emplace_back(name, hf_weight(model, name));
  }
  return out;
}

void export_gguf_merged(LlamaForCausalLM& model, const std::string& tokenizer_source,
                        const std::string& out_path, const std::string& outtype) {
  const LlamaConfig& c = model->config();
  check_exportable(c);
  const OutType out = parse_outtype(outtype);

  io::GgufWriter w;
  w.add_string("general.architecture", "llama");
  w.add_string("general.type", "model");
  w.add_string("general.name", "qlora-cpp merged export");
  w.add_u32("general.file_type", out.file_type);
  w.add_u32("llama.vocab_size", static_cast<uint32_t>(c.vocab_size));
  w.add_u32("llama.context_length", static_cast<uint32_t>(c.max_position_embeddings));
  w.add_u32("llama.embedding_length", static_cast<uint32_t>(c.hidden_size));
  w.add_u32("llama.block_count", static_cast<uint32_t>(c.num_hidden_layers));
  w.add_u32("llama.feed_forward_length", static_cast<uint32_t>(c.intermediate_size));
  w.add_u32("llama.attention.head_count", static_cast<uint32_t>(c.num_attention_heads));
  w.add_u32("llama.attention.head_count_kv", static_cast<uint32_t>(c.num_key_value_heads));
  w.add_u32("llama.rope.dimension_count", static_cast<uint32_t>(c.attention_head_dim()));
  if (c.attention_head_dim() * c.num_attention_heads != c.hidden_size) {
    w.add_u32("llama.attention.key_length", static_cast<uint32_t>(c.attention_head_dim()));
    w.add_u32("llama.attention.value_length", static_cast<uint32_t>(c.attention_head_dim()));
  }
  w.add_f32("llama.attention.layer_norm_rms_epsilon", static_cast<float>(c.rms_norm_eps));
  w.add_f32("llama.rope.freq_base", static_cast<float>(c.rope_theta));
  if (c.rope_scaling.type == "linear") {
    w.add_string("llama.rope.scaling.type", "linear");
    w.add_f32("llama.rope.scaling.factor", static_cast<float>(c.rope_scaling.factor));
  }

  // A SentencePiece model wins over a tokenizer.json beside it (Llama 2 folders hold both;
  // their tokenizer.json is a conversion of it), as in llama.cpp's converter.
  if (ends_with(tokenizer_source, ".gguf")) {
    add_tokenizer_from_gguf(w, tokenizer_source, c.vocab_size);
  } else if (file_exists(tokenizer_source + "/tokenizer.model")) {
    add_tokenizer_from_sentencepiece(w, tokenizer_source + "/tokenizer.model", c);
  } else if (file_exists(tokenizer_source + "/tokenizer.json")) {
    add_tokenizer_from_json(w, tokenizer_source, c);
  } else {
    throw GgufError("GGUF export: tokenizer source '" + tokenizer_source +
                    "' is neither a .gguf file nor a folder holding tokenizer.model or "
                    "tokenizer.json");
  }

  if (auto factors = rope_freq_factors(c))
    w.add_tensor("rope_freqs.weight", *factors, GgmlType::F32);
  const std::vector<std::string> hf_names = hf_weight_names(model);
  std::optional<exporters::detail::QuantMixState> mix_state;
  if (out.mix) {
    std::vector<std::string> names;
    for (const std::string& hf : hf_names) names.push_back(gguf_tensor_name(hf));
    mix_state = exporters::detail::make_quant_mix_state(
        static_cast<int32_t>(c.num_hidden_layers), static_cast<int32_t>(c.num_attention_heads),
        static_cast<int32_t>(c.num_key_value_heads), names);
  }
  // Every tensor is announced now and computed (merged, permuted, encoded)
  // only when the writer reaches it: one weight in memory at a time.
  for (const std::string& hf : hf_names) {
    const std::string name = gguf_tensor_name(hf);
    const std::vector<int64_t> shape = hf_weight_shape(c, hf);
    GgmlType type = shape.size() == 1 ? GgmlType::F32 : out.matrix;
    if (out.mix) {
      // llama-quantize's choice for this tensor (ne0: the row length).
      type = static_cast<GgmlType>(exporters::detail::choose_type(
          *out.mix, name, shape.back(), static_cast<int>(shape.size()), *mix_state));
    }
    w.add_tensor_lazy(name, shape, type, [&model, &c, hf]() {
      const at::Tensor t = hf_weight(model, hf);
      if (ends_with(hf, "q_proj.weight"))
        return models::apply_llama_qk_permutation(t, c.num_attention_heads);
      if (ends_with(hf, "k_proj.weight"))
        return models::apply_llama_qk_permutation(t, c.num_key_value_heads);
      return t;
    });
  }
  w.write(out_path);
}

void export_gguf_adapter(LlamaForCausalLM& model, const std::string& out_path) {
  const LlamaConfig& c = model->config();
  check_exportable(c);
  const auto layers = nn::lora_layers(*model);
  if (layers.empty()) throw GgufError("GGUF export: the model has no LoRA layers to export");
  for (const auto& [path, layer] : layers) {
    if (layer->lora_config().use_dora) {
      throw GgufError("GGUF export: layer " + path +
                      " is a DoRA adapter; llama.cpp's LoRA adapters cannot express DoRA "
                      "(export a merged model instead)");
    }
  }
  const auto& first = layers.front().second;
  const double alpha = first->scaling() * static_cast<double>(first->lora_A.size(0));
  const float alpha_f = static_cast<float>(alpha);

  io::GgufWriter w;
  w.add_string("general.architecture", "llama");
  w.add_string("general.type", "adapter");
  w.add_string("general.name", "qlora-cpp LoRA adapter");
  w.add_string("adapter.type", "lora");
  w.add_f32("adapter.lora.alpha", alpha_f);
  for (const auto& [path, layer] : layers) {
    const std::string base = gguf_tensor_name(path + ".weight");
    at::Tensor a = layer->lora_A.detach().to(at::kCPU, at::kFloat).contiguous();
    at::Tensor b = layer->lora_B.detach().to(at::kCPU, at::kFloat).contiguous();
    const int64_t r = a.size(0);
    // llama.cpp scales by alpha / r (r = lora_b's ne[0]); fold any difference into B.
    const double ratio = layer->scaling() / (static_cast<double>(alpha_f) / static_cast<double>(r));
    if (std::abs(ratio - 1.0) > 1e-6) b = b * ratio;
    if (ends_with(path, "self_attn.q_proj")) {
      b = models::apply_llama_qk_permutation(b, c.num_attention_heads);
    } else if (ends_with(path, "self_attn.k_proj")) {
      b = models::apply_llama_qk_permutation(b, c.num_key_value_heads);
    }
    w.add_tensor(base + ".lora_a", a, GgmlType::F32);  // ne [in, r]
    w.add_tensor(base + ".lora_b", b, GgmlType::F32);  // ne [r, out]
  }
  w.write(out_path);
}

}  // namespace qlora::models
