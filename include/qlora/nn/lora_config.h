// LoRA hyper-parameters and the rules that pick target modules, with PEFT's
// semantics so an adapter_config.json means the same thing here and there.
#pragma once

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "qlora/quant_state.h"

namespace qlora::nn {

struct LoRAConfig {
  int64_t r = 8;
  double alpha = 16.0;
  double dropout = 0.0;
  // PEFT's target_modules as a list: a module matches when its full dotted
  // name equals an entry or ends with "." + entry; "all-linear" matches every
  // Linear except the output layer (lm_head), as PEFT does.
  std::vector<std::string> target_modules;
  // PEFT's target_modules given as a string: a regex that must match the
  // whole module name. Used when non-empty (target_modules is then ignored).
  std::string target_regex;
  std::vector<std::string> exclude_modules;  // same matching rule, wins over targets
  bool use_rslora = false;                   // scaling alpha / sqrt(r) instead of alpha / r
  bool use_dora = false;                     // weight-decomposed LoRA (trainable magnitude)
  std::string bias = "none";                 // "none" | "all" | "lora_only": which biases train

  double scaling() const {
    return use_rslora ? alpha / std::sqrt(static_cast<double>(r)) : alpha / static_cast<double>(r);
  }
  // Throws on r < 1, dropout outside [0, 1), unknown bias mode, bad regex.
  void validate() const;
  // Whether the module at dotted path `name` is a target (not checking type).
  bool matches(const std::string& name) const;
  // The JSON of PEFT's adapter_config.json keys (r, lora_alpha, ...), the
  // one form every file we write uses; from_json validates and names
  // `source` in its errors.
  std::string to_json() const;
  static LoRAConfig from_json(const std::string& text, const std::string& source = "LoRA config");
};

// How QLoRALinear stores its frozen base weight.
struct QuantizedBaseConfig {
  QuantConfig quant;                          // nf4|fp4, blocksize, double quant, storage
  at::ScalarType compute_dtype = at::kFloat;  // dtype of the 4-bit matmul
};

}  // namespace qlora::nn
