#include "qlora/models/llama_config.h"

#include <ATen/TensorOperators.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/pow.h>
#include <ATen/ops/rsub.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/where.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "qlora/io/gguf.h"
#include "util/fs.h"

namespace qlora::models {

namespace {

using nlohmann::json;

const char* dtype_to_hf(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return "float32";
    case at::kBFloat16:
      return "bfloat16";
    case at::kHalf:
      return "float16";
    case at::kDouble:
      return "float64";
    default:
      TORCH_CHECK(false, "LlamaConfig: torch_dtype ", t, " has no config.json name");
  }
}

// Typed access to a config.json object; every error names the document and key.
class JsonFields {
 public:
  JsonFields(const json& j, std::string source) : j_(j), source_(std::move(source)) {}

  bool present(const std::string& key) const { return j_.contains(key) && !j_[key].is_null(); }

  int64_t integer(const std::string& key) const {
    const json& v = required(key);
    if (!v.is_number_integer()) fail(key, "an integer", v);
    return v.get<int64_t>();
  }
  int64_t integer(const std::string& key, int64_t fallback) const {
    return present(key) ? integer(key) : fallback;
  }
  double number(const std::string& key, double fallback) const {
    if (!present(key)) return fallback;
    const json& v = j_[key];
    if (!v.is_number()) fail(key, "a number", v);
    return v.get<double>();
  }
  bool boolean(const std::string& key, bool fallback) const {
    if (!present(key)) return fallback;
    const json& v = j_[key];
    if (!v.is_boolean()) fail(key, "true or false", v);
    return v.get<bool>();
  }
  std::string string(const std::string& key, const std::string& fallback) const {
    if (!present(key)) return fallback;
    const json& v = j_[key];
    if (!v.is_string()) fail(key, "a string", v);
    return v.get<std::string>();
  }
  std::optional<int64_t> optional_integer(const std::string& key,
                                          std::optional<int64_t> fallback) const {
    if (!j_.contains(key)) return fallback;
    if (j_[key].is_null()) return std::nullopt;
    return integer(key);
  }
  // An integer or a list of integers (eos_token_id).
  std::vector<int64_t> integer_list(const std::string& key, std::vector<int64_t> fallback) const {
    if (!j_.contains(key)) return fallback;
    const json& v = j_[key];
    if (v.is_null()) return {};
    if (v.is_number_integer()) return {v.get<int64_t>()};
    if (!v.is_array()) fail(key, "an integer or a list of integers", v);
    std::vector<int64_t> out;
    for (const json& e : v) {
      if (!e.is_number_integer()) fail(key, "an integer or a list of integers", v);
      out.push_back(e.get<int64_t>());
    }
    return out;
  }
  const json& object(const std::string& key) const {
    const json& v = j_[key];
    if (!v.is_object()) fail(key, "an object", v);
    return v;
  }
  [[noreturn]] void fail(const std::string& key, const std::string& expected,
                         const json& got) const {
    TORCH_CHECK(false, source_, ": \"", key, "\" must be ", expected, ", got ", got.dump());
  }
  const std::string& source() const { return source_; }

 private:
  const json& required(const std::string& key) const {
    TORCH_CHECK(j_.contains(key), source_, ": missing required key \"", key, "\"");
    TORCH_CHECK(!j_[key].is_null(), source_, ": required key \"", key, "\" is null");
    return j_[key];
  }

  const json& j_;
  std::string source_;
};

at::ScalarType dtype_from_hf(const JsonFields& f, const std::string& key) {
  const std::string name = f.string(key, "float32");
  if (name == "float32" || name == "float") return at::kFloat;
  if (name == "bfloat16") return at::kBFloat16;
  if (name == "float16" || name == "half") return at::kHalf;
  if (name == "float64") return at::kDouble;
  TORCH_CHECK(false, f.source(), ": \"", key, "\" is \"", name,
              "\"; expected float32, bfloat16, float16 or float64");
}

// rope_parameters (transformers 5) or rope_scaling (4.x): the same fields,
// the type under "rope_type" or the older "type".
void read_rope(const JsonFields& top, const std::string& key, LlamaConfig& c) {
  const JsonFields f(top.object(key), top.source() + " \"" + key + "\"");
  const std::string type =
      f.present("rope_type") ? f.string("rope_type", "default") : f.string("type", "default");
  c.rope_theta = f.number("rope_theta", c.rope_theta);
  TORCH_CHECK(f.number("partial_rotary_factor", 1.0) == 1.0, f.source(),
              ": partial_rotary_factor != 1 is not supported by the LLaMA architecture");
  c.rope_scaling.type = type;
  if (type == "default") return;
  TORCH_CHECK(type == "linear" || type == "llama3", f.source(), ": rope type \"", type,
              "\" is not supported (supported: default, linear, llama3)");
  TORCH_CHECK(f.present("factor"), f.source(), ": rope type \"", type, "\" needs \"factor\"");
  c.rope_scaling.factor = f.number("factor", 1.0);
  if (type == "llama3") {
    for (const char* k : {"low_freq_factor", "high_freq_factor"})
      TORCH_CHECK(f.present(k), f.source(), ": rope type \"llama3\" needs \"", k, "\"");
    c.rope_scaling.low_freq_factor = f.number("low_freq_factor", 1.0);
    c.rope_scaling.high_freq_factor = f.number("high_freq_factor", 4.0);
    c.rope_scaling.original_max_position_embeddings =
        f.integer("original_max_position_embeddings", 0);
  }
}

double gguf_float(const io::GgufReader& r, const std::string& key, double fallback) {
  if (!r.has(key)) return fallback;
  const io::GgufValue& v = r.get(key);
  return v.type() == io::GgufType::FLOAT64 ? v.get_f64() : v.get_f32();
}

}  // namespace

void LlamaConfig::validate() const {
  TORCH_CHECK(model_type == "llama" || model_type == "qwen2", "LlamaConfig: model_type \"",
              model_type, "\" is not supported (llama, qwen2)");
  for (auto [name, v] : {std::pair<const char*, int64_t>{"vocab_size", vocab_size},
                         {"hidden_size", hidden_size},
                         {"intermediate_size", intermediate_size},
                         {"num_hidden_layers", num_hidden_layers},
                         {"num_attention_heads", num_attention_heads},
                         {"num_key_value_heads", num_key_value_heads}})
    TORCH_CHECK(v > 0, "LlamaConfig: ", name, " must be positive, got ", v);
  TORCH_CHECK(num_attention_heads % num_key_value_heads == 0, "LlamaConfig: num_attention_heads (",
              num_attention_heads, ") must be a multiple of num_key_value_heads (",
              num_key_value_heads, ")");
  TORCH_CHECK(head_dim > 0 || hidden_size % num_attention_heads == 0, "LlamaConfig: hidden_size (",
              hidden_size, ") must be a multiple of num_attention_heads (", num_attention_heads,
              ") when head_dim is not given");
  TORCH_CHECK(head_dim >= 0, "LlamaConfig: head_dim must be positive, got ", head_dim);
  TORCH_CHECK(attention_head_dim() % 2 == 0, "LlamaConfig: head_dim must be even for RoPE, got ",
              attention_head_dim());
  TORCH_CHECK(rms_norm_eps > 0, "LlamaConfig: rms_norm_eps must be positive, got ", rms_norm_eps);
  TORCH_CHECK(rope_theta > 0, "LlamaConfig: rope_theta must be positive, got ", rope_theta);
  TORCH_CHECK(hidden_act == "silu", "LlamaConfig: hidden_act \"", hidden_act,
              "\" is not supported (silu)");
  TORCH_CHECK(attention_dropout >= 0 && attention_dropout < 1,
              "LlamaConfig: attention_dropout must be in [0, 1), got ", attention_dropout);
  const RopeScaling& rs = rope_scaling;
  TORCH_CHECK(rs.type == "default" || rs.type == "linear" || rs.type == "llama3",
              "LlamaConfig: rope_scaling type \"", rs.type, "\" is not supported");
  if (rs.type != "default")
    TORCH_CHECK(rs.factor > 0, "LlamaConfig: rope_scaling factor must be positive, got ",
                rs.factor);
  if (rs.type == "llama3")
    TORCH_CHECK(rs.high_freq_factor != rs.low_freq_factor && rs.low_freq_factor > 0,
                "LlamaConfig: llama3 rope needs 0 < low_freq_factor != high_freq_factor, got ",
                rs.low_freq_factor, " and ", rs.high_freq_factor);
  TORCH_CHECK(rope_freq_factors.empty() ||
                  static_cast<int64_t>(rope_freq_factors.size()) == attention_head_dim() / 2,
              "LlamaConfig: rope_freq_factors has ", rope_freq_factors.size(),
              " entries, expected head_dim / 2 = ", attention_head_dim() / 2);
}

at::Tensor LlamaConfig::rope_inv_freq() const {
  validate();
  const int64_t dim = attention_head_dim();
  // The same op sequence as transformers: 1.0 / (base ** (arange(0, dim, 2) / dim)).
  const at::Tensor exponent = at::arange(0, dim, 2, at::kLong).to(at::kFloat) / dim;
  at::Tensor inv_freq = at::pow(rope_theta, exponent).reciprocal();
  if (rope_scaling.type == "linear") {
    inv_freq = inv_freq / rope_scaling.factor;
  } else if (rope_scaling.type == "llama3") {
    const double factor = rope_scaling.factor;
    const double low = rope_scaling.low_freq_factor, high = rope_scaling.high_freq_factor;
    const int64_t old_context = rope_scaling.original_max_position_embeddings > 0
                                    ? rope_scaling.original_max_position_embeddings
                                    : max_position_embeddings;
    const double low_freq_wavelen = static_cast<double>(old_context) / low;
    const double high_freq_wavelen = static_cast<double>(old_context) / high;
    const at::Tensor wavelen = inv_freq.reciprocal() * (2 * M_PI);
    at::Tensor scaled = at::where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq);
    const at::Tensor smooth = (wavelen.reciprocal() * old_context - low) / (high - low);
    const at::Tensor smoothed = at::rsub(smooth, 1) * scaled / factor + smooth * scaled;
    const at::Tensor medium =
        (wavelen < high_freq_wavelen).logical_not() * (wavelen > low_freq_wavelen).logical_not();
    inv_freq = at::where(medium, smoothed, scaled);
  }
  if (!rope_freq_factors.empty()) inv_freq = inv_freq / at::tensor(rope_freq_factors, at::kFloat);
  return inv_freq.contiguous();
}

LlamaConfig LlamaConfig::from_json(const std::string& json_text, const std::string& source) {
  json j;
  try {
    j = json::parse(json_text);
  } catch (const json::exception& e) {  // out_of_range too: "1e999"
    TORCH_CHECK(false, source, ": invalid JSON: ", e.what());
  }
  TORCH_CHECK(j.is_object(), source, ": expected a JSON object, got ", j.type_name());
  const JsonFields f(j, source);
  LlamaConfig c;
  c.model_type = f.string("model_type", "llama");
  TORCH_CHECK(c.model_type == "llama" || c.model_type == "qwen2", source, ": model_type \"",
              c.model_type, "\" is not a LLaMA-family model this loader supports (llama, qwen2)");
  TORCH_CHECK(!f.boolean("use_sliding_window", false), source,
              ": use_sliding_window=true (sliding-window attention) is not supported");
  c.vocab_size = f.integer("vocab_size");
  c.hidden_size = f.integer("hidden_size");
  c.intermediate_size = f.integer("intermediate_size");
  c.num_hidden_layers = f.integer("num_hidden_layers");
  c.num_attention_heads = f.integer("num_attention_heads");
  c.num_key_value_heads = f.integer("num_key_value_heads", c.num_attention_heads);
  c.head_dim = f.integer("head_dim", 0);
  c.rms_norm_eps = f.number("rms_norm_eps", 1e-6);
  c.rope_theta = f.number("rope_theta", 10000.0);
  if (f.present("rope_parameters")) {
    read_rope(f, "rope_parameters", c);
  } else if (f.present("rope_scaling")) {
    read_rope(f, "rope_scaling", c);
  }
  c.attention_bias = f.boolean("attention_bias", false);
  c.mlp_bias = f.boolean("mlp_bias", false);
  c.attention_dropout = f.number("attention_dropout", 0.0);
  c.hidden_act = f.string("hidden_act", "silu");
  c.tie_word_embeddings = f.boolean("tie_word_embeddings", false);
  c.max_position_embeddings = f.integer("max_position_embeddings", 2048);
  c.initializer_range = f.number("initializer_range", 0.02);
  c.bos_token_id = f.optional_integer("bos_token_id", c.bos_token_id);
  c.eos_token_ids = f.integer_list("eos_token_id", c.eos_token_ids);
  c.pad_token_id = f.optional_integer("pad_token_id", std::nullopt);
  c.torch_dtype = dtype_from_hf(f, f.present("dtype") ? "dtype" : "torch_dtype");
  try {
    c.validate();
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, source, ": ", e.msg());
  }
  return c;
}

LlamaConfig LlamaConfig::from_json_file(const std::string& path) {
  std::string text;
  try {
    text = fs::read_file(path);
  } catch (const std::system_error& e) {
    TORCH_CHECK(false, "LlamaConfig: cannot open ", path, ": ", e.code().message());
  }
  return from_json(text, path);
}

LlamaConfig LlamaConfig::from_gguf(const io::GgufReader& r) {
  const std::string src = "GGUF " + r.path();
  const std::string arch = r.get_string("general.architecture");
  TORCH_CHECK(arch == "llama", src, ": general.architecture is \"", arch,
              "\"; only \"llama\" is supported");
  LlamaConfig c;
  c.hidden_size = r.get_int("llama.embedding_length");
  c.intermediate_size = r.get_int("llama.feed_forward_length");
  c.num_hidden_layers = r.get_int("llama.block_count");
  c.num_attention_heads = r.get_int("llama.attention.head_count");
  c.num_key_value_heads = r.has("llama.attention.head_count_kv")
                              ? r.get_int("llama.attention.head_count_kv")
                              : c.num_attention_heads;
  if (r.has("llama.attention.key_length")) c.head_dim = r.get_int("llama.attention.key_length");
  c.max_position_embeddings =
      r.has("llama.context_length") ? r.get_int("llama.context_length") : c.max_position_embeddings;
  c.rms_norm_eps = gguf_float(r, "llama.attention.layer_norm_rms_epsilon", 1e-5);
  c.rope_theta = gguf_float(r, "llama.rope.freq_base", 10000.0);
  const io::GgufTensorInfo& embd = r.tensor_info("token_embd.weight");
  c.vocab_size = r.has("llama.vocab_size") ? r.get_int("llama.vocab_size") : embd.ne.at(1);
  c.tie_word_embeddings = !r.has_tensor("output.weight");
  if (r.has("llama.rope.dimension_count")) {
    const int64_t n_rot = r.get_int("llama.rope.dimension_count");
    TORCH_CHECK(n_rot == c.attention_head_dim(), src, ": llama.rope.dimension_count (", n_rot,
                ") != head_dim (", c.attention_head_dim(), "): partial RoPE is not supported");
  }
  if (r.has("llama.rope.scaling.type")) {
    const std::string type = r.get_string("llama.rope.scaling.type");
    TORCH_CHECK(type == "none" || type == "linear", src, ": llama.rope.scaling.type \"", type,
                "\" is not supported (none, linear)");
    if (type == "linear") {
      c.rope_scaling.type = "linear";
      c.rope_scaling.factor = gguf_float(r, "llama.rope.scaling.factor", 1.0);
    }
  }
  if (r.has_tensor("rope_freqs.weight")) {
    const at::Tensor f = r.dequantize("rope_freqs.weight", at::kFloat).contiguous();
    c.rope_freq_factors.assign(f.data_ptr<float>(), f.data_ptr<float>() + f.numel());
  }
  auto token = [&](const char* key) -> std::optional<int64_t> {
    return r.has(key) ? std::optional<int64_t>(r.get_int(key)) : std::nullopt;
  };
  c.bos_token_id = token("tokenizer.ggml.bos_token_id");
  c.eos_token_ids.clear();
  if (auto eos = token("tokenizer.ggml.eos_token_id")) c.eos_token_ids.push_back(*eos);
  c.pad_token_id = token("tokenizer.ggml.padding_token_id");
  try {
    c.validate();
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, src, ": ", e.msg());
  }
  return c;
}

std::string LlamaConfig::to_json() const {
  nlohmann::ordered_json j;
  j["architectures"] = {model_type == "qwen2" ? "Qwen2ForCausalLM" : "LlamaForCausalLM"};
  j["model_type"] = model_type;
  j["vocab_size"] = vocab_size;
  j["hidden_size"] = hidden_size;
  j["intermediate_size"] = intermediate_size;
  j["num_hidden_layers"] = num_hidden_layers;
  j["num_attention_heads"] = num_attention_heads;
  j["num_key_value_heads"] = num_key_value_heads;
  j["head_dim"] = attention_head_dim();
  j["hidden_act"] = hidden_act;
  j["rms_norm_eps"] = rms_norm_eps;
  j["max_position_embeddings"] = max_position_embeddings;
  j["initializer_range"] = initializer_range;
  nlohmann::ordered_json rope;
  rope["rope_type"] = rope_scaling.type;
  rope["rope_theta"] = rope_theta;
  if (rope_scaling.type != "default") rope["factor"] = rope_scaling.factor;
  if (rope_scaling.type == "llama3") {
    rope["low_freq_factor"] = rope_scaling.low_freq_factor;
    rope["high_freq_factor"] = rope_scaling.high_freq_factor;
    rope["original_max_position_embeddings"] = rope_scaling.original_max_position_embeddings > 0
                                                   ? rope_scaling.original_max_position_embeddings
                                                   : max_position_embeddings;
  }
  j["rope_parameters"] = rope;
  j["rope_theta"] = rope_theta;  // read by transformers 4.x
  if (model_type == "llama") {
    j["attention_bias"] = attention_bias;
    j["mlp_bias"] = mlp_bias;
  }
  j["attention_dropout"] = attention_dropout;
  j["tie_word_embeddings"] = tie_word_embeddings;
  j["bos_token_id"] = bos_token_id ? nlohmann::ordered_json(*bos_token_id) : nullptr;
  if (eos_token_ids.size() == 1) {
    j["eos_token_id"] = eos_token_ids[0];
  } else if (eos_token_ids.empty()) {
    j["eos_token_id"] = nullptr;
  } else {
    j["eos_token_id"] = eos_token_ids;
  }
  j["pad_token_id"] = pad_token_id ? nlohmann::ordered_json(*pad_token_id) : nullptr;
  j["dtype"] = dtype_to_hf(torch_dtype);
  j["torch_dtype"] = dtype_to_hf(torch_dtype);
  return j.dump(2);
}

}  // namespace qlora::models
