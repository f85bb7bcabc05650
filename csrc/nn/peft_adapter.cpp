#include "qlora/nn/peft_adapter.h"

#include <sys/stat.h>

#include <cerrno>
#include <cstring>
#include <nlohmann/json.hpp>
#include <set>

#include "nn/lora_config_json.h"
#include "qlora/io/atomic_file.h"
#include "qlora/io/safetensors.h"
#include "qlora/nn/apply_lora.h"
#include "qlora/nn/lora_layer.h"
#include "util/json_file.h"

namespace qlora::nn {

namespace {

constexpr const char* kPrefix = "base_model.model.";
constexpr const char* kWeightsFile = "/adapter_model.safetensors";
constexpr const char* kConfigFile = "/adapter_config.json";

void make_dir(const std::string& dir) {
  if (mkdir(dir.c_str(), 0755) != 0 && errno != EEXIST)
    TORCH_CHECK(false, "cannot create adapter directory \"", dir, "\": ", std::strerror(errno));
}

// PEFT key -> the live tensor of the model it stands for.
std::map<std::string, at::Tensor> adapter_tensors(torch::nn::Module& model) {
  std::map<std::string, at::Tensor> out;
  for (auto& [path, layer] : lora_layers(model)) {
    const std::string base = kPrefix + path;
    out[base + ".lora_A.weight"] = layer->lora_A;
    out[base + ".lora_B.weight"] = layer->lora_B;
    if (layer->lora_config().use_dora)
      out[base + ".lora_magnitude_vector"] = layer->lora_magnitude_vector;
    for (auto& p : layer->named_parameters(false))
      if (p.key() == "bias" && p.value().requires_grad()) out[base + ".bias"] = p.value();
  }
  return out;
}

nlohmann::json config_json(const LoRAConfig& c, const AdapterMetadata& meta) {
  nlohmann::json j = detail::lora_config_to_json(c);
  j["peft_type"] = "LORA";
  j["task_type"] = meta.task_type;
  j["base_model_name_or_path"] = meta.base_model_name_or_path;
  j["fan_in_fan_out"] = false;
  j["inference_mode"] = true;
  j["init_lora_weights"] = true;
  j["modules_to_save"] = nullptr;
  j["layers_to_transform"] = nullptr;
  j["revision"] = nullptr;
  return j;
}

template <typename T>
T field(const nlohmann::json& j, const std::string& file, const char* key, T fallback) {
  try {
    return util::json_field<T>(j, file, key, std::move(fallback));
  } catch (const std::runtime_error& e) {
    TORCH_CHECK(false, e.what());
  }
}

}  // namespace

std::map<std::string, at::Tensor> peft_state_dict(torch::nn::Module& model) {
  std::map<std::string, at::Tensor> out;
  for (auto& [key, t] : adapter_tensors(model))
    out[key] = t.detach().to(at::kCPU, at::kFloat).contiguous();
  return out;
}

void save_peft_adapter(const std::string& dir, torch::nn::Module& model, const LoRAConfig& config,
                       const AdapterMetadata& meta) {
  const auto tensors = peft_state_dict(model);
  TORCH_CHECK(!tensors.empty(),
              "save_peft_adapter: the model has no LoRA layers (run apply_lora first)");
  make_dir(dir);
  io::save_safetensors(dir + kWeightsFile, tensors, {{"format", "pt"}});
  const std::string json = config_json(config, meta).dump(2) + "\n";
  io::write_bytes_atomic(dir + kConfigFile, json.data(), json.size());
}

LoRAConfig read_peft_adapter_config(const std::string& dir, AdapterMetadata* meta) {
  const std::string file = dir + kConfigFile;
  nlohmann::json j;
  try {
    j = util::read_json_file(file, "adapter config");
  } catch (const std::exception& e) {
    TORCH_CHECK(false, e.what());
  }
  TORCH_CHECK(j.is_object(), file, " must hold a JSON object");
  const auto peft_type = field<std::string>(j, file, "peft_type", "LORA");
  TORCH_CHECK(peft_type == "LORA", file, ": peft_type is \"", peft_type,
              "\", only LORA is supported");
  TORCH_CHECK(!field<bool>(j, file, "fan_in_fan_out", false), file,
              ": fan_in_fan_out adapters (GPT-2 Conv1D) are not supported");
  if (meta) {
    meta->base_model_name_or_path = field<std::string>(j, file, "base_model_name_or_path", "");
    meta->task_type = field<std::string>(j, file, "task_type", "CAUSAL_LM");
  }
  return detail::lora_config_from_json(j, file);
}

void load_peft_adapter(const std::string& dir, torch::nn::Module& model) {
  const std::string file = dir + kWeightsFile;
  const auto reader = io::SafetensorsReader::open(file);
  auto targets = adapter_tensors(model);
  TORCH_CHECK(!targets.empty(), "load_peft_adapter: the model has no LoRA layers to load \"", file,
              "\" into (run apply_lora with the adapter's config first)");
  std::ostringstream problems;
  std::set<std::string> seen;
  for (const auto& info : reader.tensors()) {
    std::string key = info.name;
    // PEFT writes ".lora_A.default.weight" only in unusual saves; accept it.
    if (auto pos = key.find(".default."); pos != std::string::npos) key.erase(pos, 8);
    auto it = targets.find(key);
    if (it == targets.end()) {
      problems << "\n  unexpected tensor " << info.name << " (no LoRA layer of the model has it)";
      continue;
    }
    const auto shape = at::IntArrayRef(info.shape);
    if (shape != it->second.sizes()) {
      problems << "\n  " << info.name << " has shape " << shape << ", the model expects "
               << it->second.sizes();
      continue;
    }
    seen.insert(key);
  }
  for (const auto& [key, t] : targets)
    if (!seen.count(key)) problems << "\n  missing tensor " << key << " " << t.sizes();
  const std::string report = problems.str();
  TORCH_CHECK(report.empty(), "adapter \"", file, "\" does not fit the model:", report);
  at::NoGradGuard no_grad;
  for (const auto& info : reader.tensors()) {
    std::string key = info.name;
    if (auto pos = key.find(".default."); pos != std::string::npos) key.erase(pos, 8);
    at::Tensor& dst = targets.at(key);
    dst.copy_(reader.get(info.name));
  }
}

}  // namespace qlora::nn
