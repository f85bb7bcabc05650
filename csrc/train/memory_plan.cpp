#include "qlora/train/memory_plan.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <map>
#include <optional>
#include <sstream>

#include "qlora/io/gguf.h"
#include "qlora/io/safetensors.h"
#include "qlora/models/llama_config.h"
#include "qlora/models/loader.h"
#include "qlora/train/device.h"
#include "util/strings.h"

namespace qlora::train {
namespace {

struct LinearShape {
  std::string name;
  int64_t out, in;
  bool bias;
};

// The model's Linear layers, as LlamaForCausalLM names and shapes them.
std::vector<LinearShape> linear_shapes(const models::LlamaConfig& c) {
  const int64_t h = c.hidden_size, hd = c.attention_head_dim(), I = c.intermediate_size;
  const int64_t q = c.num_attention_heads * hd, kv = c.num_key_value_heads * hd;
  std::vector<LinearShape> out;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    out.push_back({p + "self_attn.q_proj", q, h, c.qkv_bias()});
    out.push_back({p + "self_attn.k_proj", kv, h, c.qkv_bias()});
    out.push_back({p + "self_attn.v_proj", kv, h, c.qkv_bias()});
    out.push_back({p + "self_attn.o_proj", h, q, c.o_proj_bias()});
    out.push_back({p + "mlp.gate_proj", I, h, c.has_mlp_bias()});
    out.push_back({p + "mlp.up_proj", I, h, c.has_mlp_bias()});
    out.push_back({p + "mlp.down_proj", h, I, c.has_mlp_bias()});
  }
  out.push_back({"lm_head", c.vocab_size, h, false});
  return out;
}

// A QLoRALinear's buffers: the packed codes, absmax (uint8 codes plus the
// nested float32 absmax and 256-entry map under double quantisation) and
// the 16-entry code table (ops/quant_state.cpp).
int64_t four_bit_bytes(int64_t numel, const QuantConfig& q) {
  const int64_t blocks = (numel + q.blocksize - 1) / q.blocksize;
  int64_t bytes = (numel + 1) / 2 + 16 * 4;
  if (q.double_quant) {
    bytes += blocks + (blocks + 255) / 256 * 4 + 256 * 4;
  } else {
    bytes += blocks * 4;
  }
  return bytes;
}

// PagedAdamW's two moments: 8-bit codes with a float32 absmax per 256 for
// tensors of at least 4096 elements in 8-bit mode, float32 otherwise.
int64_t optimizer_state_bytes(int64_t numel, const std::string& optimizer) {
  if (optimizer == "paged_adamw_8bit" && numel >= 4096)
    return 2 * (numel + (numel + 255) / 256 * 4);
  return 2 * numel * 4;
}

int64_t element_bytes(const std::string& dtype) { return dtype == "float32" ? 4 : 2; }

// The device the run would use; nullopt when its setting cannot be honoured
// here (a plan for a GPU run drawn up on a machine without one).
std::optional<c10::Device> planned_device(const TrainConfig& cfg) {
  try {
    return resolve_device(cfg.training.device);
  } catch (const std::invalid_argument&) {
    return std::nullopt;
  }
}

// compute_dtype auto is bfloat16 on a (bf16-capable) GPU: a CUDA run planned
// without one is assumed to get one.
std::string planned_compute_dtype(const TrainConfig& cfg, const std::optional<c10::Device>& dev) {
  if (cfg.model.compute_dtype != "auto") return cfg.model.compute_dtype;
  if (!dev) return cfg.training.device.rfind("cuda", 0) == 0 ? "bfloat16" : "float32";
  return resolve_compute_dtype("auto", *dev) == at::kFloat ? "float32" : "bfloat16";
}

std::string mib(int64_t bytes) {
  char buf[64];
  if (bytes >= (int64_t{1} << 30))
    std::snprintf(buf, sizeof buf, "%.2f GiB", static_cast<double>(bytes) / (1 << 30));
  else
    std::snprintf(buf, sizeof buf, "%.1f MiB", static_cast<double>(bytes) / (1 << 20));
  return buf;
}

// Bytes the checkpoint stores for each bitsandbytes 4-bit Linear (its
// ".weight" and every ".weight.*" tensor), by Linear name.
std::map<std::string, int64_t> stored_four_bit_bytes(const std::string& dir) {
  const io::ShardedSafetensors st = io::open_checkpoint_dir(dir);
  std::map<std::string, int64_t> linear_of_state;
  for (const auto& n : st.names()) {
    for (const char* s :
         {".weight.quant_state.bitsandbytes__nf4", ".weight.quant_state.bitsandbytes__fp4"})
      if (util::ends_with(n, s)) linear_of_state[n.substr(0, n.size() - std::string(s).size())] = 0;
  }
  std::map<std::string, int64_t> bytes;
  for (const auto& n : st.names()) {
    if (util::ends_with(n, ".quant_state.bitsandbytes__nf4") ||
        util::ends_with(n, ".quant_state.bitsandbytes__fp4"))
      continue;  // a JSON blob: parsed, not kept
    const size_t w = n.find(".weight");
    if (w == std::string::npos) continue;
    const std::string linear = n.substr(0, w);
    if (!linear_of_state.count(linear)) continue;
    const io::TensorInfo& info = st.info(n);
    bytes[linear] += static_cast<int64_t>(info.end - info.begin);
  }
  return bytes;
}

struct Source {
  std::string format;  // "gguf", "bnb-4bit" or "safetensors"
  models::LlamaConfig config;
  std::map<std::string, int64_t> gguf_bytes;  // GGUF tensor bytes by HF Linear name
  std::map<std::string, int64_t> bnb_bytes;   // stored 4-bit bytes by Linear name
};

// GGUF names of a llama block's Linears, by HF suffix (the loader's map).
std::string gguf_linear_name(const std::string& hf) {
  static const std::pair<const char*, const char*> kNames[] = {
      {"self_attn.q_proj", "attn_q"}, {"self_attn.k_proj", "attn_k"},
      {"self_attn.v_proj", "attn_v"}, {"self_attn.o_proj", "attn_output"},
      {"mlp.gate_proj", "ffn_gate"},  {"mlp.up_proj", "ffn_up"},
      {"mlp.down_proj", "ffn_down"}};
  const std::string prefix = "model.layers.";
  const size_t dot = hf.find('.', prefix.size());
  const std::string layer = hf.substr(prefix.size(), dot - prefix.size());
  const std::string rest = hf.substr(dot + 1);
  for (const auto& [h, g] : kNames)
    if (rest == h) return "blk." + layer + "." + g + ".weight";
  return "";
}

Source read_source(const TrainConfig& cfg) {
  Source s;
  s.format = models::detect_llama_format(cfg.model.path, cfg.model.format);
  if (s.format == "gguf") {
    const io::GgufReader r = io::GgufReader::open(cfg.model.path);
    s.config = models::LlamaConfig::from_gguf(r);
    for (const auto& l : linear_shapes(s.config)) {
      if (l.name == "lm_head") continue;
      const std::string g = gguf_linear_name(l.name);
      if (r.has_tensor(g)) s.gguf_bytes[l.name] = static_cast<int64_t>(r.tensor_info(g).nbytes);
    }
  } else {
    s.config = models::LlamaConfig::from_json_file(cfg.model.path + "/config.json");
    if (s.format == "bnb-4bit") s.bnb_bytes = stored_four_bit_bytes(cfg.model.path);
  }
  return s;
}

// Per token, the activations backward needs, in values: a decoder layer
// keeps its input, both norms' outputs, q/k/v (and the rotated q/k), the
// attention and o_proj outputs, gate/up, SiLU(gate) and its product, the
// down output and the residual (about 10 h + 3 kv + 5 I); each LoRA target
// keeps its dropped input (q/k/v/o/gate/up: h each, down: I). Attention
// keeps only a log-sum-exp row per head and query (flash kernels).
struct ActivationModel {
  int64_t per_layer_values;    // one layer, not checkpointed
  int64_t frozen_outputs;      // the frozen matmul outputs selective recomputation keeps
  int64_t layer_input_values;  // what a checkpointed layer keeps: its input
};

ActivationModel activation_model(const models::LlamaConfig& c, const nn::LoRAConfig& lora) {
  const int64_t h = c.hidden_size, I = c.intermediate_size;
  const int64_t kv = c.num_key_value_heads * c.attention_head_dim();
  const int64_t q = c.num_attention_heads * c.attention_head_dim();
  int64_t lora_inputs = 0;
  for (const auto& l : linear_shapes(c))
    if (l.name.rfind("model.layers.0.", 0) == 0 && lora.matches(l.name))
      lora_inputs += l.in + lora.r;
  ActivationModel m;
  m.per_layer_values = 6 * h + 2 * q + 3 * kv + 5 * I + lora_inputs + c.num_attention_heads;
  m.frozen_outputs = q + 2 * kv + 2 * h + 2 * I;
  m.layer_input_values = h;
  return m;
}

int64_t available_ram() {
  std::ifstream in("/proc/meminfo");
  std::string key;
  int64_t value = 0;
  std::string unit;
  while (in >> key >> value >> unit)
    if (key == "MemAvailable:") return value * 1024;
  return -1;
}

}  // namespace

MemoryPlan plan_memory(const TrainConfig& cfg) {
  const Source src = read_source(cfg);
  const models::LlamaConfig& c = src.config;
  const nn::LoRAConfig& lora = cfg.lora;
  const bool native = cfg.model.base_format == "gguf-native";
  const QuantConfig quant{cfg.model.blocksize, cfg.model.quant_type, cfg.model.double_quant};
  const std::optional<c10::Device> device = planned_device(cfg);
  const std::string compute = planned_compute_dtype(cfg, device);
  // On a GPU the dense tensors are held in a 16-bit compute dtype (ModelContext::load).
  const bool gpu = device ? device->is_cuda() : cfg.training.device.rfind("cuda", 0) == 0;
  const int64_t dense_width = gpu ? element_bytes(compute) : 4;
  MemoryPlan plan;
  {
    std::ostringstream m;
    m << cfg.model.path << " (" << src.format << "): " << c.num_hidden_layers << " layers, hidden "
      << c.hidden_size << ", intermediate " << c.intermediate_size << ", vocab " << c.vocab_size;
    plan.model = m.str();
  }

  // Frozen base and adapters, Linear by Linear, as the loader builds them.
  int64_t base = 0, dense_linear = 0, adapter = 0, trainable = 0, optimizer = 0, layers = 0,
          kept = 0;
  for (const auto& l : linear_shapes(c)) {
    const bool target = lora.matches(l.name);
    const int64_t numel = l.out * l.in;
    bool lora_layer = target;
    if (src.bnb_bytes.count(l.name)) {
      base += src.bnb_bytes.at(l.name);
      lora_layer = true;
    } else if (native && l.name != "lm_head") {
      TORCH_CHECK(src.gguf_bytes.count(l.name), "qlora plan: ", cfg.model.path,
                  " has no tensor for ", l.name);
      base += src.gguf_bytes.at(l.name);
      lora_layer = true;
      ++kept;
    } else if (cfg.model.quantize && l.name != "lm_head" && target) {
      // The loader quantises the LoRA targets; other Linears stay dense.
      base += four_bit_bytes(numel, quant);
      lora_layer = true;
      ++kept;
    } else {
      dense_linear += numel * dense_width;
    }
    if (l.bias) dense_linear += l.out * dense_width;
    if (!lora_layer) continue;
    ++layers;
    const int64_t r = target ? lora.r : 1;  // inert adapters: r = 1, frozen
    const int64_t a = r * l.in, b = l.out * r, mag = lora.use_dora && target ? l.out : 0;
    adapter += (a + b + mag) * 4;
    if (!target) continue;
    trainable += a + b + mag;
    for (const int64_t n : {a, b, mag})
      if (n > 0) optimizer += optimizer_state_bytes(n, cfg.training.optimizer);
    if (l.bias && (lora.bias == "all" || lora.bias == "lora_only")) {
      trainable += l.out;
      optimizer += optimizer_state_bytes(l.out, cfg.training.optimizer);
    }
  }
  const int64_t h = c.hidden_size;
  int64_t dense = dense_linear + c.vocab_size * h * dense_width +
                  (2 * c.num_hidden_layers + 1) * h * dense_width;
  if (c.tie_word_embeddings) dense -= c.vocab_size * h * dense_width;  // lm_head is the embedding

  // Activations of one micro-batch of max_length tokens per row (the upper
  // bound: padding-free layers see only real tokens).
  const int64_t tokens = cfg.training.micro_batch_size * cfg.data.max_length;
  const int64_t vbytes = element_bytes(compute);
  const ActivationModel am = activation_model(c, lora);
  const int64_t L = c.num_hidden_layers;
  const int64_t head = tokens * h * 4 * 2;  // final hidden state and its gradient
  plan.activation_bytes_without_checkpointing = tokens * L * am.per_layer_values * vbytes + head;
  int64_t checkpointed = tokens * (L * am.layer_input_values + am.per_layer_values) * vbytes + head;
  if (cfg.training.selective_recompute) checkpointed += tokens * L * am.frozen_outputs * vbytes;
  plan.activation_bytes_with_checkpointing = checkpointed;
  plan.activation_bytes = cfg.training.gradient_checkpointing
                              ? plan.activation_bytes_with_checkpointing
                              : plan.activation_bytes_without_checkpointing;

  plan.adapter_parameters = trainable;
  plan.weights_bytes = base + dense + adapter;
  plan.gradient_bytes = trainable * 4;
  plan.optimizer_bytes = cfg.training.optimizer == "adamw" ? trainable * 8 : optimizer;
  plan.peak_bytes =
      plan.weights_bytes + plan.gradient_bytes + plan.optimizer_bytes + plan.activation_bytes;

  const std::string base_kind = src.format == "bnb-4bit" ? "bitsandbytes 4-bit, as stored"
                                : native                 ? "GGUF blocks, kept"
                                : cfg.model.quantize
                                    ? cfg.model.quant_type + " blocksize " +
                                          std::to_string(quant.blocksize) +
                                          (quant.double_quant ? ", double quant" : "")
                                    : "dense";
  plan.items = {
      {"frozen base Linears", base, std::to_string(kept) + " layers, " + base_kind},
      {"dense weights", dense,
       std::string("embeddings, norms, lm_head, un-quantised Linears (") +
           (dense_width == 4 ? "float32" : compute) + ")"},
      {"LoRA parameters", adapter,
       std::to_string(trainable) + " trainable (r " + std::to_string(lora.r) + ", " +
           std::to_string(layers) + " layers)"},
      {"LoRA gradients", plan.gradient_bytes, "float32"},
      {"optimizer state", plan.optimizer_bytes,
       cfg.training.optimizer +
           (cfg.training.optimizer == "adamw"
                ? ""
                : (device && device->is_cpu() ? " (paged to a file)"
                                              : " (paged: CUDA managed memory)"))},
      {"activations", plan.activation_bytes,
       std::to_string(cfg.training.micro_batch_size) + " x " + std::to_string(cfg.data.max_length) +
           " tokens, " +
           (cfg.training.gradient_checkpointing
                ? std::string("checkpointing") +
                      (cfg.training.selective_recompute ? " + selective" : "") +
                      " (without: " + mib(plan.activation_bytes_without_checkpointing) + ")"
                : "no checkpointing (with: " + mib(plan.activation_bytes_with_checkpointing) +
                      ")")},
  };
  if (device && device->is_cuda()) {
    const auto memory = device_memory(*device);
    plan.available_bytes = memory ? memory->free_bytes : -1;
    plan.device = describe_device(*device) + " free memory";
  } else if (!device) {
    plan.device = "training.device " + cfg.training.device + " (not available here)";
  } else {
    plan.available_bytes = available_ram();
    plan.device = "CPU RAM (MemAvailable)";
  }
  return plan;
}

std::string format_memory_plan(const MemoryPlan& plan) {
  std::ostringstream out;
  out << "model: " << plan.model << "\n";
  for (const auto& it : plan.items) {
    char line[128];
    std::snprintf(line, sizeof line, "  %-22s %12s  ", it.name.c_str(), mib(it.bytes).c_str());
    out << line << it.detail << "\n";
  }
  char line[128];
  std::snprintf(line, sizeof line, "  %-22s %12s", "peak (estimate)", mib(plan.peak_bytes).c_str());
  out << line << "\n";
  if (plan.available_bytes >= 0) {
    out << plan.device << ": " << mib(plan.available_bytes)
        << " free: " << (plan.fits() ? "fits" : "DOES NOT FIT") << "\n";
  } else {
    out << plan.device << ": free memory unknown\n";
  }
  return out.str();
}

}  // namespace qlora::train
