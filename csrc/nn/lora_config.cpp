#include "qlora/nn/lora_config.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <regex>

#include "nn/lora_config_json.h"

namespace qlora::nn {

namespace {
bool name_matches(const std::string& name, const std::string& target) {
  return name == target || (name.size() > target.size() &&
                            name.compare(name.size() - target.size(), target.size(), target) == 0 &&
                            name[name.size() - target.size() - 1] == '.');
}
}  // namespace

void LoRAConfig::validate() const {
  TORCH_CHECK(r >= 1, "LoRAConfig: r must be >= 1, got ", r);
  TORCH_CHECK(dropout >= 0 && dropout < 1, "LoRAConfig: dropout must be in [0, 1), got ", dropout);
  TORCH_CHECK(bias == "none" || bias == "all" || bias == "lora_only",
              "LoRAConfig: bias must be \"none\", \"all\" or \"lora_only\", got \"", bias, "\"");
  if (!target_regex.empty()) {
    try {
      std::regex re(target_regex);
    } catch (const std::regex_error& e) {
      TORCH_CHECK(false, "LoRAConfig: target_modules regex \"", target_regex,
                  "\" is invalid: ", e.what());
    }
  }
}

bool LoRAConfig::matches(const std::string& name) const {
  for (const auto& ex : exclude_modules)
    if (name_matches(name, ex)) return false;
  if (!target_regex.empty()) return std::regex_match(name, std::regex(target_regex));
  return std::any_of(target_modules.begin(), target_modules.end(), [&](const std::string& t) {
    return t == "all-linear" ? !name_matches(name, "lm_head") : name_matches(name, t);
  });
}

std::string LoRAConfig::to_json() const { return detail::lora_config_to_json(*this).dump(); }

LoRAConfig LoRAConfig::from_json(const std::string& text, const std::string& source) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {  // out_of_range too: "1e999"
    TORCH_CHECK(false, source, " is not valid JSON: ", e.what());
  }
  return detail::lora_config_from_json(j, source);
}

}  // namespace qlora::nn
