#include "nn/lora_config_json.h"

#include <c10/util/Exception.h>

#include <vector>

#include "util/json_file.h"

namespace qlora::nn::detail {
namespace {

template <typename T>
T field(const nlohmann::json& j, const std::string& source, const char* key, T fallback) {
  try {
    return util::json_field<T>(j, source, key, std::move(fallback));
  } catch (const std::runtime_error& e) {
    TORCH_CHECK(false, e.what());
  }
}

}  // namespace

nlohmann::json lora_config_to_json(const LoRAConfig& c) {
  nlohmann::json j;
  j["r"] = c.r;
  j["lora_alpha"] = c.alpha;
  j["lora_dropout"] = c.dropout;
  // PEFT only understands "all-linear" as the whole string, not in a list.
  if (!c.target_regex.empty())
    j["target_modules"] = c.target_regex;
  else if (c.target_modules == std::vector<std::string>{"all-linear"})
    j["target_modules"] = "all-linear";
  else
    j["target_modules"] = c.target_modules;
  j["exclude_modules"] =
      c.exclude_modules.empty() ? nlohmann::json() : nlohmann::json(c.exclude_modules);
  j["use_rslora"] = c.use_rslora;
  j["use_dora"] = c.use_dora;
  j["bias"] = c.bias;
  return j;
}

LoRAConfig lora_config_from_json(const nlohmann::json& j, const std::string& source) {
  TORCH_CHECK(j.is_object(), source, ": the LoRA config must be a JSON object");
  LoRAConfig c;
  c.r = field<int64_t>(j, source, "r", 8);
  c.alpha = field<double>(j, source, "lora_alpha", 8.0);
  c.dropout = field<double>(j, source, "lora_dropout", 0.0);
  if (j.contains("target_modules") && j["target_modules"].is_string()) {
    const std::string t = j["target_modules"].get<std::string>();
    if (t == "all-linear")
      c.target_modules = {t};
    else
      c.target_regex = t;  // PEFT: a string is a regex over the full module name
  } else {
    c.target_modules = field<std::vector<std::string>>(j, source, "target_modules", {});
  }
  c.exclude_modules = field<std::vector<std::string>>(j, source, "exclude_modules", {});
  c.use_rslora = field<bool>(j, source, "use_rslora", false);
  c.use_dora = field<bool>(j, source, "use_dora", false);
  c.bias = field<std::string>(j, source, "bias", "none");
  try {
    c.validate();
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, source, ": ", e.what_without_backtrace());
  }
  return c;
}

}  // namespace qlora::nn::detail
