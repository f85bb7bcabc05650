#include "qlora/export/hf_folder.h"

#include <map>
#include <nlohmann/json.hpp>
#include <optional>

#include "qlora/io/atomic_file.h"
#include "qlora/io/safetensors.h"
#include "qlora/nn/apply_lora.h"
#include "qlora/nn/lora_layer.h"
#include "qlora/nn/qlora_linear.h"
#include "util/fs.h"

namespace qlora::exporters {

namespace {

// The model's parameters outside its LoRA layers (embeddings, norms, a dense
// head), minus a tied lm_head, optionally cast.
std::map<std::string, at::Tensor> dense_tensors(LlamaForCausalLM& model,
                                                std::optional<at::ScalarType> dtype) {
  const auto layers = nn::lora_layers(*model);
  auto inside_layer = [&](const std::string& name) {
    for (const auto& [path, layer] : layers)
      if (name.rfind(path + ".", 0) == 0) return true;
    return false;
  };
  std::map<std::string, at::Tensor> tensors;
  for (const auto& p : model->named_parameters(true)) {
    if (inside_layer(p.key())) continue;
    if (p.key() == "lm_head.weight" && model->config().tie_word_embeddings) continue;
    const at::Tensor t = p.value().detach();
    tensors[p.key()] = (dtype ? t.to(*dtype) : t).contiguous();
  }
  return tensors;
}

}  // namespace

void save_bnb_4bit_folder(LlamaForCausalLM& model, const std::string& dir, const QuantConfig& quant,
                          at::ScalarType compute_dtype) {
  std::map<std::string, at::Tensor> tensors = dense_tensors(model, std::nullopt);
  const auto layers = nn::lora_layers(*model);
  int64_t quantized = 0;
  for (const auto& [path, layer] : layers) {
    if (auto* q = dynamic_cast<nn::QLoRALinearImpl*>(layer.get())) {
      for (auto& [key, t] : q->base_state_dict(path + ".weight")) tensors[key] = t.contiguous();
      ++quantized;
    } else {
      tensors[path + ".weight"] = layer->base_weight(at::kFloat);
    }
    if (auto b = layer->base_bias()) tensors[path + ".bias"] = b->detach().contiguous();
  }
  TORCH_CHECK(quantized > 0,
              "save_bnb_4bit_folder: the model has no 4-bit layers (load it with quantize set)");

  nlohmann::json config = nlohmann::json::parse(model->config().to_json());
  config["quantization_config"] = {
      {"quant_method", "bitsandbytes"},
      {"load_in_4bit", true},
      {"load_in_8bit", false},
      {"bnb_4bit_quant_type", quant.quant_type},
      {"bnb_4bit_use_double_quant", quant.double_quant},
      {"bnb_4bit_compute_dtype", dtype_name(compute_dtype)},
      {"bnb_4bit_quant_storage", "uint8"},
      {"llm_int8_skip_modules", nlohmann::json::array({"lm_head"})},
  };
  fs::make_dirs(dir);
  io::save_safetensors(dir + "/model.safetensors", tensors, {{"format", "pt"}});
  const std::string text = config.dump(2) + "\n";
  io::write_bytes_atomic(dir + "/config.json", text.data(), text.size());
}

int copy_tokenizer_files(const std::string& from_dir, const std::string& to_dir) {
  int copied = 0;
  for (const char* name : {"tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                           "special_tokens_map.json", "generation_config.json"}) {
    const std::string src = from_dir + "/" + name;
    if (!fs::exists(src) || fs::is_dir(src)) continue;
    const std::string bytes = fs::read_file(src);
    io::write_bytes_atomic(to_dir + "/" + name, bytes.data(), bytes.size());
    ++copied;
  }
  return copied;
}

void save_hf_merged_folder(LlamaForCausalLM& model, const std::string& dir, at::ScalarType dtype,
                           const std::string& tokenizer_source) {
  std::map<std::string, at::Tensor> tensors = dense_tensors(model, dtype);
  const auto layers = nn::lora_layers(*model);
  for (const auto& [path, layer] : layers) {
    tensors[path + ".weight"] = layer->merged_weight(at::kFloat).to(dtype).contiguous();
    if (auto b = layer->base_bias()) tensors[path + ".bias"] = b->detach().to(dtype).contiguous();
  }
  nlohmann::json config = nlohmann::json::parse(model->config().to_json());
  config["torch_dtype"] = dtype_name(dtype);
  config["dtype"] = dtype_name(dtype);
  fs::make_dirs(dir);
  io::save_safetensors(dir + "/model.safetensors", tensors, {{"format", "pt"}});
  const std::string text = config.dump(2) + "\n";
  io::write_bytes_atomic(dir + "/config.json", text.data(), text.size());
  if (fs::is_dir(tokenizer_source)) copy_tokenizer_files(tokenizer_source, dir);
}

}  // namespace qlora::exporters
