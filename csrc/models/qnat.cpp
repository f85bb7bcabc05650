// The binding of a LlamaForCausalLM to the QNAT container: which tensors and
// metadata records a model becomes, and how the model is rebuilt from them.
#include "qlora/models/qnat.h"

#include <c10/util/Exception.h>
#include <torch/nn/modules/linear.h>

#include <algorithm>
#include <cstring>
#include <nlohmann/json.hpp>
#include <set>
#include <utility>

#include "nn/lora_config_json.h"
#include "qlora/nn/apply_lora.h"
#include "qlora/nn/ggml_linear.h"
#include "qlora/nn/lora_linear.h"
#include "qlora/nn/qlora_linear.h"
#include "util/strings.h"

namespace qlora::models {

using json = nlohmann::json;

namespace {

[[noreturn]] void fail(const std::string& path, const std::string& what) {
  throw io::QnatError("QNAT file " + path + ": " + what);
}
[[noreturn]] void fail_tensor(const std::string& path, const std::string& name,
                              const std::string& what) {
  throw io::QnatError("QNAT file " + path + ": tensor \"" + name + "\": " + what);
}

uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

bool is_lora_tensor(const std::string& name) {
  for (const char* s : {".lora_A", ".lora_B", ".lora_magnitude_vector"})
    if (util::ends_with(name, s)) return true;
  return false;
}

// Files written before the one LoRA JSON codec spelt two keys their own way
// ("alpha", "dropout"); read them as the codec's.
json legacy_lora_keys(json j) {
  if (j.is_object()) {
    if (j.contains("alpha") && !j.contains("lora_alpha")) j["lora_alpha"] = j["alpha"];
    if (j.contains("dropout") && !j.contains("lora_dropout")) j["lora_dropout"] = j["dropout"];
  }
  return j;
}

nn::LoRAConfig layer_lora_from_json(const json& j, const std::string& path) {
  try {
    return nn::detail::lora_config_from_json(legacy_lora_keys(j), path + " (metadata \"modules\")");
  } catch (const c10::Error& e) {
    fail(path, e.what_without_backtrace());
  }
}

}  // namespace

LlamaConfig qnat_model_config(const io::QnatFile& file) {
  const json meta = json::parse(file.metadata_json());
  if (!meta.contains("model_config") || !meta["model_config"].is_object())
    fail(file.path(), "metadata has no \"model_config\" object");
  try {
    return LlamaConfig::from_json(meta["model_config"].dump(),
                                  file.path() + " (metadata \"model_config\")");
  } catch (const std::exception& e) {
    fail(file.path(), std::string("metadata \"model_config\": ") + e.what());
  }
}

void save_qnat(const std::string& path, models::LlamaForCausalLMImpl& model,
               const QnatMetadata& metadata) {
  json meta;
  meta["format"] = "qnat";
  meta["version"] = io::kQnatVersion;
  meta["model_config"] = json::parse(model.config().to_json());
  meta["tokenizer"] = {{"source", metadata.tokenizer_source}, {"kind", metadata.tokenizer_kind}};
  meta["lora"] = metadata.lora ? nn::detail::lora_config_to_json(*metadata.lora) : json();
  if (metadata.quantization) {
    const auto& q = metadata.quantization->quant;
    meta["quantization"] = {
        {"blocksize", q.blocksize},
        {"quant_type", q.quant_type},
        {"double_quant", q.double_quant},
        {"storage", io::qnat_scalar_name(q.storage)},
        {"compute_dtype", io::qnat_scalar_name(metadata.quantization->compute_dtype)}};
  } else {
    meta["quantization"] = json();
  }
  if (!metadata.extra_json.empty()) {
    json extra;
    try {
      extra = json::parse(metadata.extra_json);
    } catch (const json::exception& e) {
      throw io::QnatError("save_qnat " + path + ": extra_json is not valid JSON: " + e.what());
    }
    if (!extra.is_object())
      throw io::QnatError("save_qnat " + path + ": extra_json must be an object");
    meta["extra"] = extra;
  }

  json modules = json::object(), quant_states = json::object();
  std::set<std::string> packed_names;
  for (const auto& [name, layer] : nn::lora_layers(model)) {
    json m;
    m["lora"] = nn::detail::lora_config_to_json(layer->lora_config());
    if (auto q = std::dynamic_pointer_cast<nn::QLoRALinearImpl>(layer)) {
      m["type"] = "qlora";
      m["compute_dtype"] = io::qnat_scalar_name(q->compute_dtype());
      const QuantState& s = q->quant_state();
      const std::string w = name + ".weight";
      json st = {{"quant_type", s.quant_type},
                 {"blocksize", s.blocksize},
                 {"dtype", io::qnat_scalar_name(s.dtype)},
                 {"shape", s.shape},
                 {"storage", io::qnat_scalar_name(q->packed_weight().scalar_type())},
                 {"packed_shape", q->packed_weight().sizes().vec()},
                 {"absmax", name + ".weight_absmax"},
                 {"quant_map", name + ".weight_quant_map"}};
      if (s.nested) {
        st["nested"] = {{"absmax", name + ".weight_nested_absmax"},
                        {"quant_map", name + ".weight_nested_quant_map"},
                        {"blocksize", s.nested->blocksize},
                        {"offset_bits", float_bits(s.nested->offset)},
                        {"dtype", io::qnat_scalar_name(s.nested->dtype)}};
      } else {
        st["nested"] = json();
      }
      quant_states[w] = st;
      packed_names.insert(w);
    } else if (auto g = std::dynamic_pointer_cast<nn::GgmlLoRALinearImpl>(layer)) {
      // A GGUF tensor's own blocks, kept: "<name>.weight" holds them as uint8.
      m["type"] = "ggml";
      m["ggml_type"] = g->ggml_type();
      m["compute_dtype"] = io::qnat_scalar_name(g->compute_dtype());
    } else if (std::dynamic_pointer_cast<nn::LoRALinearImpl>(layer)) {
      m["type"] = "lora";
    } else {
      throw io::QnatError("save_qnat " + path + ": module \"" + name +
                          "\" is a LoRA layer of an unknown kind");
    }
    modules[name] = m;
  }
  meta["modules"] = modules;
  meta["quant_states"] = quant_states;

  // Every parameter and buffer, aliases (tied weights) written once.
  io::QnatWriter writer;
  json aliases = json::object();
  std::vector<std::string> trainable;
  std::vector<std::pair<std::string, at::Tensor>> all;
  for (const auto& p : model.named_parameters(true)) {
    all.emplace_back(p.key(), p.value());
    if (p.value().requires_grad()) trainable.push_back(p.key());
  }
  for (const auto& b : model.named_buffers(true)) all.emplace_back(b.key(), b.value());
  bool wrote_adapter = false;
  std::vector<std::pair<std::string, at::Tensor>> written;
  for (auto& [name, t] : all) {
    if (!t.defined()) continue;
    if (is_lora_tensor(name)) {
      if (!metadata.include_adapter) continue;
      wrote_adapter = true;
    }
    const void* ptr = t.numel() > 0 ? t.data_ptr() : nullptr;
    // A named reference: clang 14 cannot capture a structured binding.
    const at::Tensor& tensor = t;
    const auto same = std::find_if(written.begin(), written.end(), [&](const auto& w) {
      return ptr != nullptr && w.second.data_ptr() == ptr && w.second.sizes() == tensor.sizes() &&
             w.second.scalar_type() == tensor.scalar_type() && tensor.is_contiguous();
    });
    if (same != written.end()) {
      aliases[name] = same->first;
      continue;
    }
    try {
      if (packed_names.count(name)) {
        const json& st = quant_states[name];
        writer.add_packed(name, t,
                          st["quant_type"] == "fp4" ? io::QnatDtype::kFP4 : io::QnatDtype::kNF4,
                          st["shape"].get<std::vector<int64_t>>(), name);
      } else {
        writer.add(name, t);
      }
    } catch (const io::QnatError& e) {
      throw io::QnatError("save_qnat " + path + ": " + e.what());
    }
    written.emplace_back(name, t);
  }
  meta["aliases"] = aliases;
  meta["trainable"] = trainable;
  writer.write(path, meta.dump(), wrote_adapter ? io::kQnatFlagHasAdapter : 0);
}

namespace {

class QnatWeights : public LlamaWeightSource {
 public:
  QnatWeights(const io::QnatFile& file, const json& meta, const QnatLoadOptions& opts,
              const std::set<std::string>& trainable)
      : file_(file), meta_(meta), opts_(opts), trainable_(trainable) {}

  std::shared_ptr<torch::nn::Module> linear(const std::string& name, int64_t in, int64_t out,
                                            bool bias) override {
    at::NoGradGuard no_grad;
    std::optional<at::Tensor> b;
    if (bias) b = fetch(name + ".bias", {out});
    const json& modules = meta_.at("modules");
    if (!modules.contains(name)) {
      return make_linear(fetch(name + ".weight", {out, in}), b).ptr();
    }
    const json& m = modules.at(name);
    const nn::LoRAConfig lora = layer_lora_from_json(m.at("lora"), file_.path());
    const std::string type = m.at("type").get<std::string>();
    if (type == "lora")
      return std::make_shared<nn::LoRALinearImpl>(fetch(name + ".weight", {out, in}), b, lora);
    if (type == "ggml") return ggml_linear(name, m, in, out, b, lora);
    if (type != "qlora")
      fail(file_.path(), "metadata module \"" + name + "\" has unknown type \"" + type + "\"");
    const std::string w = name + ".weight";
    if (!file_.contains(w)) fail_tensor(file_.path(), w, "missing (needed by the model)");
    const json& st = meta_.at("quant_states").at(w);
    QuantState s;
    s.shape = st.at("shape").get<std::vector<int64_t>>();
    if (s.shape != std::vector<int64_t>{out, in})
      fail_tensor(file_.path(), w,
                  "4-bit weight has shape " + util::shape_str(s.shape) +
                      " but the model config needs " + util::shape_str({out, in}));
    s.quant_type = st.at("quant_type").get<std::string>();
    s.blocksize = st.at("blocksize").get<int64_t>();
    s.dtype = *io::qnat_scalar_from_name(st.at("dtype").get<std::string>());
    s.absmax = raw(st.at("absmax").get<std::string>());
    s.code = raw(st.at("quant_map").get<std::string>());
    const json& nested = st.at("nested");
    if (!nested.is_null()) {
      NestedQuantState n;
      n.absmax = raw(nested.at("absmax").get<std::string>());
      n.code = raw(nested.at("quant_map").get<std::string>());
      n.blocksize = nested.at("blocksize").get<int64_t>();
      n.offset = bits_float(nested.at("offset_bits").get<uint32_t>());
      n.dtype = *io::qnat_scalar_from_name(nested.at("dtype").get<std::string>());
      s.nested = n;
    }
    const at::Tensor packed = raw(w);
    const auto compute = io::qnat_scalar_from_name(m.at("compute_dtype").get<std::string>());
    if (!compute) fail(file_.path(), "metadata module \"" + name + "\": unknown compute_dtype");
    return std::make_shared<nn::QLoRALinearImpl>(packed, s, b, lora, *compute);
  }

  at::Tensor tensor(const std::string& name, at::IntArrayRef shape) override {
    at::NoGradGuard no_grad;
    return fetch(name, shape);
  }

  std::set<std::string> used;

 private:
  std::shared_ptr<torch::nn::Module> ggml_linear(const std::string& name, const json& m, int64_t in,
                                                 int64_t out, const std::optional<at::Tensor>& b,
                                                 const nn::LoRAConfig& lora) {
    const std::string w = name + ".weight";
    const at::Tensor blocks = raw(w);
    if (blocks.scalar_type() != at::kByte || blocks.dim() != 2 || blocks.size(0) != out)
      fail_tensor(file_.path(), w,
                  "ggml blocks must be a uint8 [" + std::to_string(out) + ", row bytes] tensor");
    const auto compute = io::qnat_scalar_from_name(m.at("compute_dtype").get<std::string>());
    if (!compute) fail(file_.path(), "metadata module \"" + name + "\": unknown compute_dtype");
    try {
      return std::make_shared<nn::GgmlLoRALinearImpl>(blocks, m.at("ggml_type").get<std::string>(),
                                                      out, in, b, lora, *compute);
    } catch (const c10::Error& e) {
      fail_tensor(file_.path(), w, e.what_without_backtrace());
    }
  }

  at::Tensor raw(const std::string& name) {
    if (!file_.contains(name)) fail_tensor(file_.path(), name, "missing (needed by the model)");
    used.insert(name);
    at::Tensor t = file_.tensor(name);
    if (!opts_.zero_copy || trainable_.count(name)) t = t.clone();
    return t.to(opts_.device);
  }
  at::Tensor fetch(const std::string& name, at::IntArrayRef shape) {
    at::Tensor t = raw(name);
    if (t.sizes() != shape)
      fail_tensor(file_.path(), name,
                  "has shape " + util::shape_str(t.sizes().vec()) + " but the model config needs " +
                      util::shape_str(shape.vec()));
    if (!t.is_floating_point())
      fail_tensor(
          file_.path(), name,
          "is " + io::qnat_scalar_name(t.scalar_type()) + ", expected a floating-point tensor");
    return t;
  }

  const io::QnatFile& file_;
  const json& meta_;
  const QnatLoadOptions& opts_;
  const std::set<std::string>& trainable_;
};

}  // namespace

LlamaForCausalLM load_qnat(const std::string& path, const QnatLoadOptions& options,
                           QnatMetadata* metadata) {
  const io::QnatFile file = io::QnatFile::open(path, options.verify_checksums);
  const json meta = json::parse(file.metadata_json());
  std::optional<LlamaForCausalLM> model;
  std::set<std::string> trainable;
  json aliases;
  std::set<std::string> used;
  try {
    trainable = meta.at("trainable").get<std::set<std::string>>();
    aliases = meta.at("aliases");
    QnatWeights weights(file, meta, options, trainable);
    try {
      model.emplace(qnat_model_config(file), weights);
    } catch (const io::QnatError&) {
      throw;
    } catch (const json::exception&) {
      throw;
    } catch (const std::exception& e) {
      fail(path, std::string("building the model failed: ") + e.what());
    }
    used = weights.used;
  } catch (const json::exception& e) {
    fail(path, std::string("malformed metadata: ") + e.what());
  }

  // Every parameter and buffer from the file (LoRA weights, and anything the
  // constructors made themselves), bit for bit.
  {
    at::NoGradGuard no_grad;
    std::vector<std::pair<std::string, at::Tensor>> all;
    for (const auto& p : (*model)->named_parameters(true)) all.emplace_back(p.key(), p.value());
    for (const auto& b : (*model)->named_buffers(true)) all.emplace_back(b.key(), b.value());
    for (auto& [name, t] : all) {
      std::string src = name;
      if (aliases.contains(name) && aliases[name].is_string())
        src = aliases[name].get<std::string>();
      if (!file.contains(src)) {
        if (is_lora_tensor(name) && !file.has_adapter()) continue;  // fresh no-op adapter
        fail_tensor(path, src, "missing (the model has \"" + name + "\")");
      }
      used.insert(src);
      const io::QnatTensor& info = file.info(src);
      if (info.dtype == io::QnatDtype::kNF4 || info.dtype == io::QnatDtype::kFP4) {
        const at::Tensor v = file.tensor(src);
        if (v.sizes() != t.sizes() || v.scalar_type() != t.scalar_type())
          fail_tensor(path, src, "packed storage does not match the model's \"" + name + "\"");
        if (v.data_ptr() != t.data_ptr()) t.copy_(v);
        continue;
      }
      const at::ScalarType dt = *io::qnat_scalar_type(info.dtype);
      if (info.shape != t.sizes().vec() || dt != t.scalar_type())
        fail_tensor(path, src,
                    std::string("is ") + io::qnat_dtype_name(info.dtype) + " " +
                        util::shape_str(info.shape) + " but the model's \"" + name + "\" is " +
                        io::qnat_scalar_name(t.scalar_type()) + " " +
                        util::shape_str(t.sizes().vec()));
      const at::Tensor v = file.tensor(src);
      if (t.numel() > 0 && v.data_ptr() != t.data_ptr()) t.copy_(v);
    }
    for (const auto& p : (*model)->named_parameters(true))
      p.value().requires_grad_(trainable.count(p.key()) != 0);
  }
  for (const auto& t : file.tensors())
    if (!used.count(t.name))
      fail_tensor(path, t.name, "unexpected: not part of the model the metadata describes");

  if (metadata) {
    *metadata = QnatMetadata{};
    try {
      metadata->tokenizer_source = meta.at("tokenizer").value("source", "");
      metadata->tokenizer_kind = meta.at("tokenizer").value("kind", "");
      if (!meta.at("lora").is_null())
        metadata->lora = nn::detail::lora_config_from_json(legacy_lora_keys(meta.at("lora")),
                                                           path + " (metadata \"lora\")");
      const json& q = meta.at("quantization");
      if (!q.is_null()) {
        nn::QuantizedBaseConfig b;
        b.quant.blocksize = q.at("blocksize").get<int64_t>();
        b.quant.quant_type = q.at("quant_type").get<std::string>();
        b.quant.double_quant = q.at("double_quant").get<bool>();
        b.quant.storage =
            io::qnat_scalar_from_name(q.at("storage").get<std::string>()).value_or(at::kByte);
        b.compute_dtype = io::qnat_scalar_from_name(q.at("compute_dtype").get<std::string>())
                              .value_or(at::kFloat);
        metadata->quantization = b;
      }
      metadata->include_adapter = file.has_adapter();
      if (meta.contains("extra")) metadata->extra_json = meta["extra"].dump();
    } catch (const json::exception& e) {
      fail(path, std::string("malformed metadata: ") + e.what());
    } catch (const c10::Error& e) {
      fail(path, std::string("malformed metadata: ") + e.what());
    }
  }
  (*model)->eval();
  return *model;
}

}  // namespace qlora::models
