#include "qlora/train/config.h"

#include <c10/util/Exception.h>
#include <yaml-cpp/yaml.h>

#include <functional>
#include <map>
#include <sstream>
#include <stdexcept>

#include "util/strings.h"

namespace qlora::train {

namespace {

// One config key: how to read it from YAML into the struct and write it back.
struct Field {
  std::function<void(TrainConfig&, const YAML::Node&)> read;
  std::function<void(const TrainConfig&, YAML::Emitter&)> write;
};

// A string yaml-cpp would write plain or single-quoted but read back as another string
// (a carriage return, other control bytes, DEL, bytes of invalid UTF-8) goes out
// double-quoted, where they are escapes: every written config reads back as itself.
bool needs_escapes(const std::string& s) {
  for (const char ch : s) {
    const auto b = static_cast<unsigned char>(ch);
    if (b < 0x20 || b == 0x7F || b >= 0x80) return true;
  }
  return false;
}

template <typename T>
void emit(YAML::Emitter& e, const T& value) {
  e << value;
}
void emit(YAML::Emitter& e, const std::string& value) {
  if (needs_escapes(value)) e << YAML::DoubleQuoted;
  e << value;
}
void emit(YAML::Emitter& e, const std::vector<std::string>& values) {
  e << YAML::BeginSeq;
  for (const auto& v : values) emit(e, v);
  e << YAML::EndSeq;
}

template <typename T>
Field make_field(std::function<T&(TrainConfig&)> ref) {
  return {
      [ref](TrainConfig& c, const YAML::Node& n) { ref(c) = n.as<T>(); },
      [ref](const TrainConfig& c, YAML::Emitter& e) { emit(e, ref(const_cast<TrainConfig&>(c))); }};
}

#define QLORA_FIELD(key, member)                                                          \
  {                                                                                       \
    key, make_field<decltype(TrainConfig{}.member)>(                                      \
             [](TrainConfig& c) -> decltype(TrainConfig{}.member) & { return c.member; }) \
  }

const std::map<std::string, Field>& fields() {
  static const std::map<std::string, Field> table = {
      QLORA_FIELD("model.path", model.path),
      QLORA_FIELD("model.format", model.format),
      QLORA_FIELD("model.tokenizer", model.tokenizer),
      QLORA_FIELD("model.quantize", model.quantize),
      QLORA_FIELD("model.base_format", model.base_format),
      QLORA_FIELD("model.quant_type", model.quant_type),
      QLORA_FIELD("model.blocksize", model.blocksize),
      QLORA_FIELD("model.double_quant", model.double_quant),
      QLORA_FIELD("model.compute_dtype", model.compute_dtype),
      QLORA_FIELD("lora.r", lora.r),
      QLORA_FIELD("lora.alpha", lora.alpha),
      QLORA_FIELD("lora.dropout", lora.dropout),
      QLORA_FIELD("lora.target_modules", lora.target_modules),
      QLORA_FIELD("lora.target_regex", lora.target_regex),
      QLORA_FIELD("lora.exclude_modules", lora.exclude_modules),
      QLORA_FIELD("lora.use_rslora", lora.use_rslora),
      QLORA_FIELD("lora.use_dora", lora.use_dora),
      QLORA_FIELD("lora.bias", lora.bias),
      QLORA_FIELD("data.train", data.train),
      QLORA_FIELD("data.eval", data.eval),
      QLORA_FIELD("data.format", data.format),
      QLORA_FIELD("data.template", data.template_name),
      QLORA_FIELD("data.max_length", data.max_length),
      QLORA_FIELD("data.packing", data.packing),
      QLORA_FIELD("data.shuffle", data.shuffle),
      QLORA_FIELD("data.eval_split", data.eval_split),
      QLORA_FIELD("data.eval_max_examples", data.eval_max_examples),
      QLORA_FIELD("data.strict", data.strict),
      QLORA_FIELD("training.epochs", training.epochs),
      QLORA_FIELD("training.max_steps", training.max_steps),
      QLORA_FIELD("training.micro_batch_size", training.micro_batch_size),
      QLORA_FIELD("training.gradient_accumulation_steps", training.gradient_accumulation_steps),
      QLORA_FIELD("training.lr", training.lr),
      QLORA_FIELD("training.scheduler", training.scheduler),
      QLORA_FIELD("training.warmup_steps", training.warmup_steps),
      QLORA_FIELD("training.weight_decay", training.weight_decay),
      QLORA_FIELD("training.max_grad_norm", training.max_grad_norm),
      QLORA_FIELD("training.optimizer", training.optimizer),
      QLORA_FIELD("training.gradient_checkpointing", training.gradient_checkpointing),
      QLORA_FIELD("training.selective_recompute", training.selective_recompute),
      QLORA_FIELD("training.seed", training.seed),
      QLORA_FIELD("training.eval_every", training.eval_every),
      QLORA_FIELD("training.save_every", training.save_every),
      QLORA_FIELD("training.keep_last", training.keep_last),
      QLORA_FIELD("training.log_every", training.log_every),
      QLORA_FIELD("training.max_consecutive_nonfinite", training.max_consecutive_nonfinite),
      QLORA_FIELD("training.threads", training.threads),
      QLORA_FIELD("training.device", training.device),
      QLORA_FIELD("training.distributed.backend", training.distributed.backend),
      QLORA_FIELD("training.distributed.timeout_seconds", training.distributed.timeout_seconds),
      QLORA_FIELD("training.distributed.bucket_mb", training.distributed.bucket_mb),
      QLORA_FIELD("training.distributed.shard_optimizer", training.distributed.shard_optimizer),
      QLORA_FIELD("generation.prompts", generation.prompts),
      QLORA_FIELD("generation.max_new_tokens", generation.max_new_tokens),
      QLORA_FIELD("output_dir", output_dir),
      QLORA_FIELD("resume", resume),
  };
  return table;
}

[[noreturn]] void fail(const std::string& source, const std::string& message) {
  throw std::invalid_argument(source + ": " + message);
}

std::string valid_keys_text() {
  std::string s;
  for (const auto& k : TrainConfig::valid_keys()) s += "\n  " + k;
  return s;
}

void set_key(TrainConfig& c, const std::string& source, const std::string& key,
             const YAML::Node& v) {
  auto it = fields().find(key);
  if (it == fields().end())
    fail(source, "unknown key \"" + key + "\"; valid keys are:" + valid_keys_text());
  try {
    it->second.read(c, v);
  } catch (const YAML::Exception& e) {
    std::ostringstream value;
    value << v;
    fail(source,
         "key \"" + key + "\" has an invalid value \"" + value.str() + "\" (" + e.msg + ")");
  }
}

// Walks nested maps, turning them into dotted keys.
void read_node(TrainConfig& c, const std::string& source, const YAML::Node& node,
               const std::string& prefix) {
  if (!node.IsMap())
    fail(source, (prefix.empty() ? "the file" : "\"" + prefix + "\"") + " must be a mapping");
  for (const auto& kv : node) {
    const std::string key = (prefix.empty() ? "" : prefix + ".") + kv.first.as<std::string>();
    const bool is_section = kv.second.IsMap();
    if (is_section && !fields().count(key)) {
      read_node(c, source, kv.second, key);
    } else {
      set_key(c, source, key, kv.second);
    }
  }
}

void check_choice(const std::string& source, const std::string& key, const std::string& value,
                  const std::vector<std::string>& choices) {
  for (const auto& c : choices)
    if (value == c) return;
  std::string list;
  for (const auto& c : choices) list += (list.empty() ? "" : ", ") + c;
  fail(source, "\"" + key + "\" must be one of " + list + ", got \"" + value + "\"");
}

void validate(const TrainConfig& c, const std::string& source) {
  if (c.model.path.empty()) fail(source, "\"model.path\" is required");
  if (c.data.train.empty()) fail(source, "\"data.train\" is required");
  check_choice(source, "model.quant_type", c.model.quant_type, {"nf4", "fp4"});
  check_choice(source, "model.base_format", c.model.base_format, {"requantize", "gguf-native"});
  if (c.model.base_format == "gguf-native" && c.model.format != "gguf" &&
      !(c.model.format == "auto" && util::ends_with(c.model.path, ".gguf")))
    fail(source,
         "\"model.base_format\": gguf-native keeps a GGUF file's blocks, but model.path \"" +
             c.model.path + "\" is not a .gguf file (set model.format: gguf if it is one)");
  check_choice(source, "model.compute_dtype", c.model.compute_dtype,
               {"auto", "float32", "bfloat16", "float16"});
  if (c.training.device != "auto" && c.training.device != "cpu" && c.training.device != "cuda" &&
      !(c.training.device.rfind("cuda:", 0) == 0 && c.training.device.size() > 5 &&
        c.training.device.size() <= 9 &&
        c.training.device.find_first_not_of("0123456789", 5) == std::string::npos))
    fail(source, "\"training.device\" must be auto, cpu, cuda or cuda:N, got \"" +
                     c.training.device + "\"");
  check_choice(source, "training.scheduler", c.training.scheduler,
               {"constant", "linear", "cosine"});
  check_choice(source, "training.optimizer", c.training.optimizer,
               {"paged_adamw_32bit", "paged_adamw_8bit", "adamw"});
  check_choice(source, "data.template", c.data.template_name,
               {"alpaca", "chatml", "smollm2", "plain"});
  if (c.training.micro_batch_size < 1) fail(source, "\"training.micro_batch_size\" must be >= 1");
  if (c.training.gradient_accumulation_steps < 1)
    fail(source, "\"training.gradient_accumulation_steps\" must be >= 1");
  if (c.training.max_steps <= 0 && c.training.epochs < 1)
    fail(source, "set \"training.epochs\" >= 1 or \"training.max_steps\" > 0");
  if (c.lora.r < 1) fail(source, "\"lora.r\" must be >= 1");
  try {
    c.lora.validate();
  } catch (const c10::Error& e) {
    fail(source, std::string("\"lora\": ") + e.what_without_backtrace());
  }
  if (c.data.max_length < 8) fail(source, "\"data.max_length\" must be >= 8");
  if (c.data.eval_split < 0 || c.data.eval_split >= 1)
    fail(source, "\"data.eval_split\" must be in [0, 1)");
  check_choice(source, "training.distributed.backend", c.training.distributed.backend,
               {"auto", "gloo", "nccl"});
  if (!(c.training.distributed.timeout_seconds > 0))
    fail(source, "\"training.distributed.timeout_seconds\" must be > 0");
  if (c.training.distributed.shard_optimizer && c.training.optimizer == "adamw")
    fail(source,
         "\"training.distributed.shard_optimizer\" needs paged_adamw_32bit or paged_adamw_8bit");
  if (!(c.training.distributed.bucket_mb > 0))
    fail(source, "\"training.distributed.bucket_mb\" must be > 0");
  if (c.training.keep_last < 1) fail(source, "\"training.keep_last\" must be >= 1");
  if (c.training.selective_recompute && !c.training.gradient_checkpointing)
    fail(source,
         "\"training.selective_recompute\" needs \"training.gradient_checkpointing\": true");
}

TrainConfig parse(const YAML::Node& root, const std::vector<std::string>& overrides,
                  const std::string& source) {
  TrainConfig c;
  if (root && !root.IsNull()) read_node(c, source, root, "");
  for (const std::string& o : overrides) {
    const auto eq = o.find('=');
    if (eq == std::string::npos || eq == 0)
      fail("--set " + o, "expected key=value, e.g. training.lr=1e-4");
    YAML::Node value;
    try {
      value = YAML::Load(o.substr(eq + 1));
    } catch (const YAML::Exception& e) {
      fail("--set " + o, "the value is not valid YAML (" + e.msg + ")");
    }
    set_key(c, "--set " + o, o.substr(0, eq), value);
  }
  validate(c, source);
  return c;
}

}  // namespace

nn::LoRAConfig TrainConfig::default_lora() {
  nn::LoRAConfig lora;
  lora.dropout = 0.05;
  lora.target_modules = {"all-linear"};
  return lora;
}

std::vector<std::string> TrainConfig::valid_keys() {
  std::vector<std::string> keys;
  for (const auto& kv : fields()) keys.push_back(kv.first);
  return keys;
}

namespace {

// A conversion yaml-cpp refuses outside a known key (a list where a map
// belongs, say) still names the file.
TrainConfig parse_named(const YAML::Node& root, const std::vector<std::string>& overrides,
                        const std::string& source) {
  try {
    return parse(root, overrides, source);
  } catch (const YAML::Exception& e) {
    fail(source, "invalid config: " + e.msg + " (line " + std::to_string(e.mark.line + 1) + ")");
  }
}

}  // namespace

TrainConfig TrainConfig::from_yaml_string(const std::string& text,
                                          const std::vector<std::string>& overrides,
                                          const std::string& source) {
  YAML::Node root;
  try {
    root = YAML::Load(text);
  } catch (const YAML::Exception& e) {
    fail(source, "not valid YAML: " + e.msg + " (line " + std::to_string(e.mark.line + 1) + ")");
  }
  return parse_named(root, overrides, source);
}

TrainConfig TrainConfig::from_yaml_file(const std::string& path,
                                        const std::vector<std::string>& overrides) {
  YAML::Node root;
  try {
    root = YAML::LoadFile(path);
  } catch (const YAML::BadFile&) {
    fail(path, "cannot open the config file");
  } catch (const YAML::Exception& e) {
    fail(path, "not valid YAML: " + e.msg + " (line " + std::to_string(e.mark.line + 1) + ")");
  }
  return parse_named(root, overrides, path);
}

std::string TrainConfig::to_yaml() const {
  // Group the dotted keys back into sections, in table order.
  std::map<std::string, std::vector<std::string>> sections;
  std::vector<std::string> top;
  for (const auto& [key, f] : fields()) {
    const auto dot = key.find('.');
    if (dot == std::string::npos)
      top.push_back(key);
    else
      sections[key.substr(0, dot)].push_back(key);
  }
  YAML::Emitter e;
  e << YAML::BeginMap;
  for (const auto& [section, keys] : sections) {
    e << YAML::Key << section << YAML::Value << YAML::BeginMap;
    for (const auto& key : keys) {
      e << YAML::Key << key.substr(section.size() + 1) << YAML::Value;
      fields().at(key).write(*this, e);
    }
    e << YAML::EndMap;
  }
  for (const auto& key : top) {
    e << YAML::Key << key << YAML::Value;
    fields().at(key).write(*this, e);
  }
  e << YAML::EndMap;
  return std::string(e.c_str()) + "\n";
}

}  // namespace qlora::train
