#include "qlora/models/loader.h"

#include <c10/util/Exception.h>
#include <sys/stat.h>

#include <algorithm>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "qlora/io/gguf.h"
#include "qlora/io/safetensors.h"
#include "qlora/models/gguf_qk_permutation.h"
#include "qlora/nn/ggml_linear.h"
#include "qlora/nn/lora_linear.h"
#include "qlora/nn/qlora_linear.h"
#include "qlora/quant_state.h"
#include "util/fs.h"
#include "util/json_file.h"
#include "util/strings.h"

namespace qlora::models {

namespace {

using fs::is_dir;
using fs::is_file;
using util::ends_with;
using util::starts_with;

nlohmann::json read_json(const std::string& path) {
  try {
    return util::read_json_file(path, "load_llama:");
  } catch (const std::exception& e) {
    TORCH_CHECK(false, e.what());
  }
}

// ---- bitsandbytes quantization_config ------------------------------------------

struct BnbConfig {
  at::ScalarType compute_dtype = at::kFloat;
  std::string quant_type = "nf4";
};

// nullopt when config.json has no quantization_config; errors for any
// quantisation this loader cannot read.
std::optional<BnbConfig> read_bnb_config(const nlohmann::json& j, const std::string& path) {
  if (!j.is_object() || !j.contains("quantization_config") || j["quantization_config"].is_null())
    return std::nullopt;
  const nlohmann::json& q = j["quantization_config"];
  const std::string where = path + " \"quantization_config\"";
  TORCH_CHECK(q.is_object(), "load_llama: ", where, " must be an object");
  const std::string method = q.value("quant_method", std::string("bitsandbytes"));
  TORCH_CHECK(method == "bitsandbytes", "load_llama: ", where, ": quant_method \"", method,
              "\" is not supported (bitsandbytes 4-bit only)");
  TORCH_CHECK(!q.value("load_in_8bit", false), "load_llama: ", where,
              ": load_in_8bit checkpoints are not supported (bitsandbytes 4-bit only)");
  TORCH_CHECK(q.value("load_in_4bit", false), "load_llama: ", where,
              ": expected \"load_in_4bit\": true");
  BnbConfig bnb;
  bnb.quant_type = q.value("bnb_4bit_quant_type", std::string("nf4"));
  TORCH_CHECK(bnb.quant_type == "nf4" || bnb.quant_type == "fp4", "load_llama: ", where,
              ": bnb_4bit_quant_type \"", bnb.quant_type, "\" is not nf4 or fp4");
  if (q.contains("bnb_4bit_compute_dtype") && q["bnb_4bit_compute_dtype"].is_string()) {
    const std::string name = q["bnb_4bit_compute_dtype"];
    try {
      bnb.compute_dtype = dtype_from_name(name);
    } catch (const c10::Error&) {
      TORCH_CHECK(false, "load_llama: ", where, ": unknown bnb_4bit_compute_dtype \"", name, "\"");
    }
  }
  return bnb;
}

// ---- Tensor stores: Hugging Face names over safetensors or GGUF -----------------

struct TensorStore {
  std::string description;  // the checkpoint, for errors about what it lacks
  std::vector<std::string> names;
  std::function<bool(const std::string&)> contains;
  std::function<at::Tensor(const std::string&)> get;  // as stored (GGUF: dequantised float32)
  std::function<std::string(const std::string&)> file_of;
  // Called once get()'s zero-copy view has been converted (a copy is all
  // that is kept): its mapped pages may leave memory. GGUF's get() copies
  // and releases on its own.
  std::function<void(const std::string&)> release;
  // GGUF only: a weight's stored blocks, rows in Hugging Face order.
  struct Blocks {
    at::Tensor bytes;            // uint8 [out, row bytes]
    std::string ggml_type;       // "Q4_K"
    std::vector<int64_t> shape;  // [out, in]
  };
  std::function<Blocks(const std::string&)> blocks;
};

TensorStore safetensors_store(const std::string& dir) {
  auto st = std::make_shared<io::ShardedSafetensors>(io::open_checkpoint_dir(dir));
  TensorStore s;
  s.description = st->path();
  s.names = st->names();
  s.contains = [st](const std::string& n) { return st->contains(n); };
  s.get = [st](const std::string& n) { return st->get(n); };
  s.release = [st](const std::string& n) { st->release(n); };
  s.file_of = [st](const std::string& n) {
    for (const auto& shard : st->shards())
      if (shard.contains(n)) return shard.path();
    return st->path();
  };
  return s;
}

// transformers' GGUF tensor names of a llama block, HF suffix -> GGUF suffix.
const std::vector<std::pair<std::string, std::string>>& gguf_block_names() {
  static const std::vector<std::pair<std::string, std::string>> names = {
      {"input_layernorm", "attn_norm"}, {"post_attention_layernorm", "ffn_norm"},
      {"self_attn.q_proj", "attn_q"},   {"self_attn.k_proj", "attn_k"},
      {"self_attn.v_proj", "attn_v"},   {"self_attn.o_proj", "attn_output"},
      {"mlp.gate_proj", "ffn_gate"},    {"mlp.up_proj", "ffn_up"},
      {"mlp.down_proj", "ffn_down"}};
  return names;
}

// GGUF name -> HF name; nullopt for names that have none.
std::optional<std::string> hf_name_of_gguf(const std::string& g) {
  if (g == "token_embd.weight") return "model.embed_tokens.weight";
  if (g == "output_norm.weight") return "model.norm.weight";
  if (g == "output.weight") return "lm_head.weight";
  if (!starts_with(g, "blk.")) return std::nullopt;
  const size_t dot = g.find('.', 4);
  if (dot == std::string::npos) return std::nullopt;
  const std::string layer = g.substr(4, dot - 4), rest = g.substr(dot + 1);
  if (layer.empty() || layer.find_first_not_of("0123456789") != std::string::npos)
    return std::nullopt;
  for (const auto& [hf, gg] : gguf_block_names())
    for (const char* leaf : {".weight", ".bias"})
      if (rest == gg + leaf) return "model.layers." + layer + "." + hf + leaf;
  return std::nullopt;
}

TensorStore gguf_store(const io::GgufReader& reader, const LlamaConfig& config) {
  auto hf_to_gguf = std::make_shared<std::map<std::string, std::string>>();
  TensorStore s;
  s.description = reader.path();
  for (const auto& t : reader.tensors()) {
    if (t.name == "rope_freqs.weight") continue;  // read into the config
    const auto hf = hf_name_of_gguf(t.name);
    s.names.push_back(hf ? *hf : t.name);  // unmapped names stay and are reported unexpected
    if (hf) (*hf_to_gguf)[*hf] = t.name;
  }
  s.contains = [hf_to_gguf](const std::string& n) { return hf_to_gguf->count(n) != 0; };
  const int64_t n_head = config.num_attention_heads, n_kv = config.num_key_value_heads;
  s.get = [reader, hf_to_gguf, n_head, n_kv](const std::string& n) {
    const at::Tensor t = reader.dequantize(hf_to_gguf->at(n), at::kFloat);
    reader.release(hf_to_gguf->at(n));  // the dequantised copy is all that is kept
    // llama.cpp's converter interleaves the rotary halves of q/k rows.
    if (n.find(".self_attn.q_proj.") != std::string::npos)
      return models::reverse_llama_qk_permutation(t, n_head);
    if (n.find(".self_attn.k_proj.") != std::string::npos)
      return models::reverse_llama_qk_permutation(t, n_kv);
    return t;
  };
  s.blocks = [reader, hf_to_gguf, n_head, n_kv](const std::string& n) {
    const io::GgufTensorInfo& info = reader.tensor_info(hf_to_gguf->at(n));
    TensorStore::Blocks b{reader.raw(info.name), io::ggml_type_name(info.type), info.torch_shape()};
    // The permutation moves whole rows, and a row is a whole number of
    // blocks: it applies to the stored bytes as to the values.
    if (n.find(".self_attn.q_proj.") != std::string::npos)
      b.bytes = models::reverse_llama_qk_permutation(b.bytes, n_head);
    else if (n.find(".self_attn.k_proj.") != std::string::npos)
      b.bytes = models::reverse_llama_qk_permutation(b.bytes, n_kv);
    return b;
  };
  s.file_of = [path = reader.path(), hf_to_gguf](const std::string& n) {
    auto it = hf_to_gguf->find(n);
    return path + (it == hf_to_gguf->end() ? "" : " (tensor " + it->second + ")");
  };
  return s;
}

QuantState state_to(QuantState s, const c10::Device& device) {
  s.absmax = s.absmax.to(device);
  s.code = s.code.to(device);
  if (s.nested) {
    s.nested->absmax = s.nested->absmax.to(device);
    s.nested->code = s.nested->code.to(device);
  }
  return s;
}

// ---- The weight source that streams a checkpoint into the model ------------------

class StreamingWeights : public LlamaWeightSource {
 public:
  StreamingWeights(TensorStore store, const LoadOptions& opts, std::optional<BnbConfig> bnb,
                   std::string config_source)
      : store_(std::move(store)),
        opts_(opts),
        bnb_(std::move(bnb)),
        config_source_(std::move(config_source)) {}

  std::shared_ptr<torch::nn::Module> linear(const std::string& name, int64_t in, int64_t out,
                                            bool bias) override {
    at::NoGradGuard no_grad;
    std::optional<at::Tensor> b;
    if (bias) b = fetch(name + ".bias", {out});
    const bool target = opts_.lora && opts_.lora->matches(name);
    // Which layers are 4-bit is the checkpoint's business (bitsandbytes skips lm_head).
    if (bnb_ && (store_.contains(name + ".weight.quant_state.bitsandbytes__nf4") ||
                 store_.contains(name + ".weight.quant_state.bitsandbytes__fp4")))
      return packed_linear(name, in, out, b, target);
    // Kept GGUF blocks: every Linear but lm_head (dense, as below).
    if (opts_.gguf_native && name != "lm_head") return ggml_linear(name, in, out, b, target);
    const at::Tensor w = fetch(name + ".weight", {out, in});
    // lm_head stays dense: quantising the output layer costs the most accuracy.
    const bool quantize = opts_.quantize && name != "lm_head" && (target || !opts_.lora);
    if (quantize) {
      quantized.push_back(name);
      if (!target) inert.push_back(name);
      return std::make_shared<nn::QLoRALinearImpl>(w, b, target ? *opts_.lora : inert_config(),
                                                   *opts_.quantize);
    }
    if (target) return std::make_shared<nn::LoRALinearImpl>(w, b, *opts_.lora);
    return make_linear(w, b).ptr();
  }

  at::Tensor tensor(const std::string& name, at::IntArrayRef shape) override {
    at::NoGradGuard no_grad;
    return fetch(name, shape);
  }

  // Every tensor of the checkpoint must have been used.
  void check_all_used(const LlamaConfig& config) const {
    std::vector<std::string> unexpected;
    for (const auto& n : store_.names) {
      if (used_.count(n) || ends_with(n, "rotary_emb.inv_freq")) continue;  // HF ignores these too
      if (n == "lm_head.weight" && config.tie_word_embeddings) continue;    // the tied copy
      unexpected.push_back(n);
    }
    if (unexpected.empty()) return;
    std::string list;
    for (size_t i = 0; i < unexpected.size() && i < 8; ++i) list += "\n  " + unexpected[i];
    if (unexpected.size() > 8) list += "\n  ... (" + std::to_string(unexpected.size()) + " in all)";
    TORCH_CHECK(false, "load_llama: ", store_.file_of(unexpected[0]), ": unexpected tensor \"",
                unexpected[0], "\", not part of the model ", config_source_, " describes (",
                config.num_hidden_layers, " layers, model_type ", config.model_type, "):", list);
  }

  std::vector<std::string> quantized, inert;

 private:
  static nn::LoRAConfig inert_config() {
    nn::LoRAConfig c;
    c.r = 1;
    return c;
  }

  at::Tensor fetch(const std::string& name, at::IntArrayRef shape) {
    TORCH_CHECK(store_.contains(name), "load_llama: ", store_.description, ": missing tensor \"",
                name, "\" (needed by the model ", config_source_, " describes)");
    const at::Tensor t = store_.get(name);
    TORCH_CHECK(t.sizes() == shape, "load_llama: ", store_.file_of(name), ": tensor \"", name,
                "\" has shape ", t.sizes(), " but ", config_source_, " needs ", shape);
    TORCH_CHECK(t.is_floating_point(), "load_llama: ", store_.file_of(name), ": tensor \"", name,
                "\" is ", t.scalar_type(), ", expected a floating-point tensor",
                bnb_ ? "" : " (a 4-bit checkpoint needs a quantization_config in config.json)");
    used_.insert(name);
    at::Tensor out = t.to(opts_.device, opts_.dtype);
    // A converted tensor no longer needs its pages of the file: a 7B
    // checkpoint read tensor by tensor never becomes resident as a whole.
    if (store_.release && !out.is_alias_of(t)) store_.release(name);
    return out;
  }

  std::shared_ptr<torch::nn::Module> ggml_linear(const std::string& name, int64_t in, int64_t out,
                                                 const std::optional<at::Tensor>& b, bool target) {
    const std::string key = name + ".weight";
    TORCH_CHECK(store_.contains(key), "load_llama: ", store_.description, ": missing tensor \"",
                key, "\" (needed by the model ", config_source_, " describes)");
    TensorStore::Blocks blocks = store_.blocks(key);
    TORCH_CHECK(blocks.shape == std::vector<int64_t>({out, in}),
                "load_llama: ", store_.file_of(key), ": tensor \"", key, "\" has shape ",
                at::IntArrayRef(blocks.shape), " but ", config_source_, " needs [", out, ", ", in,
                "]");
    used_.insert(key);
    quantized.push_back(name);
    if (!target) inert.push_back(name);
    try {
      return std::make_shared<nn::GgmlLoRALinearImpl>(
          blocks.bytes.to(opts_.device), blocks.ggml_type, out, in, b,
          target ? *opts_.lora : inert_config(), opts_.gguf_native->compute_dtype);
    } catch (const c10::Error& e) {
      TORCH_CHECK(false, "load_llama: ", store_.file_of(key), ": ", e.msg());
    }
  }

  std::shared_ptr<torch::nn::Module> packed_linear(const std::string& name, int64_t in, int64_t out,
                                                   const std::optional<at::Tensor>& b,
                                                   bool target) {
    const std::string prefix = name + ".weight";
    std::map<std::string, at::Tensor> parts;
    for (const char* suffix :
         {"", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map",
          ".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4"}) {
      const std::string key = prefix + suffix;
      if (!store_.contains(key)) continue;
      parts[key] = store_.get(key);
      used_.insert(key);
    }
    std::pair<at::Tensor, QuantState> q;
    try {
      q = QuantState::from_state_dict(prefix, parts);
    } catch (const c10::Error& e) {
      TORCH_CHECK(false, "load_llama: ", store_.file_of(prefix), ": ", e.msg());
    }
    TORCH_CHECK(q.second.shape == std::vector<int64_t>({out, in}),
                "load_llama: ", store_.file_of(prefix), ": 4-bit tensor \"", prefix,
                "\" has shape ", at::IntArrayRef(q.second.shape), " but ", config_source_,
                " needs [", out, ", ", in, "]");
    const at::ScalarType compute =
        opts_.quantize ? opts_.quantize->compute_dtype : bnb_->compute_dtype;
    quantized.push_back(name);
    if (!target) inert.push_back(name);
    return std::make_shared<nn::QLoRALinearImpl>(q.first.to(opts_.device),
                                                 state_to(q.second, opts_.device), b,
                                                 target ? *opts_.lora : inert_config(), compute);
  }

  TensorStore store_;
  LoadOptions opts_;
  std::optional<BnbConfig> bnb_;
  std::string config_source_;
  std::set<std::string> used_;
};

// apply_lora's freezing and report, for a model whose LoRA layers were
// built while loading. Inert adapters stay frozen.
nn::LoRAReport lora_report(LlamaForCausalLMImpl& model, const nn::LoRAConfig& config,
                           const std::vector<std::string>& replaced,
                           const std::vector<std::string>& inert) {
  std::set<std::string> inert_set(inert.begin(), inert.end());
  for (auto& p : model.named_parameters()) {
    const std::string& name = p.key();
    const size_t dot = name.rfind('.');
    const std::string leaf = name.substr(dot + 1), owner = name.substr(0, dot);
    const bool adapter = leaf == "lora_A" || leaf == "lora_B" || leaf == "lora_magnitude_vector";
    const bool trained_bias =
        leaf == "bias" && (config.bias == "all" ||
                           (config.bias == "lora_only" &&
                            std::find(replaced.begin(), replaced.end(), owner) != replaced.end()));
    p.value().requires_grad_((adapter && !inert_set.count(owner)) || trained_bias);
  }
  nn::LoRAReport report;
  report.replaced = replaced;
  for (const auto& p : model.parameters()) {
    report.total_parameters += p.numel();
    if (p.requires_grad()) report.trainable_parameters += p.numel();
    report.memory_bytes += p.numel() * p.element_size();
  }
  for (const auto& b : model.buffers()) report.memory_bytes += b.numel() * b.element_size();
  return report;
}

void freeze_inert(LlamaForCausalLMImpl& model, const std::vector<std::string>& inert) {
  std::set<std::string> inert_set(inert.begin(), inert.end());
  for (auto& p : model.named_parameters()) {
    const std::string& name = p.key();
    if (inert_set.count(name.substr(0, name.rfind('.')))) p.value().requires_grad_(false);
  }
}

}  // namespace

std::string detect_llama_format(const std::string& path, const std::string& format) {
  TORCH_CHECK(format == "auto" || format == "hf" || format == "gguf",
              "load_llama: format must be \"auto\", \"hf\" or \"gguf\", got \"", format, "\"");
  if (format == "gguf" || (format == "auto" && ends_with(path, ".gguf"))) {
    TORCH_CHECK(is_file(path), "load_llama: GGUF file ", path, " does not exist");
    return "gguf";
  }
  TORCH_CHECK(is_dir(path), "load_llama: ", path,
              " is neither a Hugging Face model folder nor a .gguf file");
  const std::string config = path + "/config.json";
  TORCH_CHECK(is_file(config), "load_llama: ", path, " has no config.json");
  return read_bnb_config(read_json(config), config) ? "bnb-4bit" : "safetensors";
}

LlamaForCausalLM load_llama(const std::string& path, const LoadOptions& opts, LoadReport* report) {
  if (opts.lora) opts.lora->validate();
  TORCH_CHECK(at::isFloatingType(opts.dtype), "load_llama: dtype must be floating point, got ",
              opts.dtype);
  const std::string format = detect_llama_format(path, opts.format);
  LoadReport local;
  LoadReport& rep = report ? *report : local;
  rep = LoadReport();
  rep.format = format;

  std::optional<BnbConfig> bnb;
  TensorStore store;
  TORCH_CHECK(!opts.gguf_native || format == "gguf", "load_llama: ", path,
              " is not a GGUF file: keeping ggml blocks (gguf-native bases) needs one");
  if (format == "gguf") {
    const io::GgufReader reader = io::GgufReader::open(path);
    rep.config = LlamaConfig::from_gguf(reader);
    rep.config_source = "GGUF " + path;
    store = gguf_store(reader, rep.config);
  } else {
    rep.config_source = path + "/config.json";
    rep.config = LlamaConfig::from_json_file(rep.config_source);
    bnb = read_bnb_config(read_json(rep.config_source), rep.config_source);
    store = safetensors_store(path);
  }
  StreamingWeights weights(std::move(store), opts, bnb, rep.config_source);
  LlamaForCausalLM model(rep.config, weights);
  weights.check_all_used(rep.config);
  model->eval();  // as transformers' from_pretrained

  rep.quantized = weights.quantized;
  rep.inert_adapters = weights.inert;
  if (opts.lora) {
    std::vector<std::string> replaced;  // in tree order, as apply_lora lists them
    const std::set<std::string> inert(weights.inert.begin(), weights.inert.end());
    for (const auto& item : model->named_modules("", false))
      if (std::dynamic_pointer_cast<nn::LoRALayerImpl>(item.value()) && !inert.count(item.key()))
        replaced.push_back(item.key());
    if (replaced.empty()) {
      std::string have;
      for (const auto& item : model->named_modules("", false))
        if (std::dynamic_pointer_cast<torch::nn::LinearImpl>(item.value()) ||
            std::dynamic_pointer_cast<nn::LoRALayerImpl>(item.value()))
          have += (have.empty() ? "" : ", ") + item.key();
      TORCH_CHECK(false, "load_llama: no module matches the LoRA targets (target_modules=",
                  c10::ArrayRef<std::string>(opts.lora->target_modules),
                  opts.lora->target_regex.empty() ? "" : ", regex=" + opts.lora->target_regex,
                  "); Linear modules in the model: ", have);
    }
    rep.lora = lora_report(*model, *opts.lora, replaced, weights.inert);
  } else {
    freeze_inert(*model, weights.inert);
  }
  return model;
}

}  // namespace qlora::models
