#include "qlora/quant_state.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <nlohmann/json.hpp>

#include <cstring>
#include <utility>

#include "common/python_float.h"
#include "qlora/ops.h"

namespace qlora {

namespace {

constexpr const char* kStateKeyPrefix = "quant_state.bitsandbytes__";

const at::Tensor& require_key(const std::map<std::string, at::Tensor>& tensors,
                              const std::string& key) {
  auto it = tensors.find(key);
  TORCH_CHECK(it != tensors.end(), "bitsandbytes 4-bit state: missing tensor \"", key, "\"");
  return it->second;
}

nlohmann::json parse_state_json(const std::string& key, const at::Tensor& bytes) {
  TORCH_CHECK(bytes.scalar_type() == at::kByte && bytes.dim() == 1, "bitsandbytes 4-bit state: \"",
              key, "\" must be a 1-D uint8 tensor of JSON bytes, got ", bytes.scalar_type(),
              bytes.sizes());
  const at::Tensor b = bytes.contiguous().cpu();
  const std::string text(reinterpret_cast<const char*>(b.const_data_ptr<uint8_t>()),
                         static_cast<size_t>(b.numel()));
  try {
    nlohmann::json j = nlohmann::json::parse(text);
    TORCH_CHECK(j.is_object(), "not a JSON object");
    return j;
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "bitsandbytes 4-bit state: \"", key, "\" is not a valid JSON object (",
                e.what(), ")");
  }
}

template <typename T>
T json_field(const nlohmann::json& j, const std::string& key, const char* field) {
  TORCH_CHECK(j.contains(field), "bitsandbytes 4-bit state: \"", key, "\" lacks the field \"",
              field, "\"");
  try {
    return j.at(field).get<T>();
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "bitsandbytes 4-bit state: field \"", field, "\" of \"", key,
                "\" has the wrong type (", e.what(), ")");
  }
}

void check_code_table(const std::string& key, const at::Tensor& stored, const std::string& type) {
  const at::Tensor expected = code_table_4bit(type);
  TORCH_CHECK(stored.scalar_type() == at::kFloat && stored.numel() == 16, "\"", key,
              "\" must be 16 float32 values, got ", stored.scalar_type(), stored.sizes());
  // We decode with the built-in table; a checkpoint carrying another table
  // would silently decode differently, so refuse it.
  TORCH_CHECK(std::memcmp(stored.contiguous().cpu().const_data_ptr<float>(),
                          expected.const_data_ptr<float>(), 16 * sizeof(float)) == 0,
              "\"", key, "\" differs from the standard ", type, " table");
}

}  // namespace

std::string dtype_name(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return "float32";
    case at::kHalf:
      return "float16";
    case at::kBFloat16:
      return "bfloat16";
    case at::kDouble:
      return "float64";
    case at::kByte:
      return "uint8";
    default:
      TORCH_CHECK(false, "no bitsandbytes name for dtype ", dtype);
  }
}

at::ScalarType dtype_from_name(const std::string& name) {
  if (name == "float32") return at::kFloat;
  if (name == "float16") return at::kHalf;
  if (name == "bfloat16") return at::kBFloat16;
  if (name == "float64") return at::kDouble;
  if (name == "uint8") return at::kByte;
  TORCH_CHECK(false, "unknown dtype name \"", name,
              "\" (expected float32, float16, bfloat16, float64 or uint8)");
}

int64_t QuantState::numel() const {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  return n;
}

at::Tensor QuantState::float_absmax() const {
  if (!nested) return absmax;
  at::Tensor a =
      dequantize_blockwise(absmax, nested->absmax, nested->code, nested->blocksize, at::kFloat);
  return a.add_(nested->offset);
}

std::string QuantState::to_json() const {
  // Field order and separators of Python's json.dumps, as bitsandbytes
  // writes it, so files are byte-identical to bitsandbytes' own.
  std::string s = "{\"quant_type\": \"" + quant_type +
                  "\", \"blocksize\": " + std::to_string(blocksize) + ", \"dtype\": \"" +
                  dtype_name(dtype) + "\", \"shape\": [";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  s += "]";
  if (nested) {
    s += ", \"nested_blocksize\": " + std::to_string(nested->blocksize) + ", \"nested_dtype\": \"" +
         dtype_name(nested->dtype) +
         "\", \"nested_offset\": " + detail::python_float_repr(nested->offset);
  }
  return s + "}";
}

std::map<std::string, at::Tensor> QuantState::to_state_dict(const std::string& prefix,
                                                            const at::Tensor& packed) const {
  std::map<std::string, at::Tensor> out;
  out[prefix] = packed;
  out[prefix + ".absmax"] = absmax;
  out[prefix + ".quant_map"] = code;
  if (nested) {
    out[prefix + ".nested_absmax"] = nested->absmax;
    out[prefix + ".nested_quant_map"] = nested->code;
  }
  std::string json = to_json();
  at::Tensor bytes = at::empty({static_cast<int64_t>(json.size())}, at::kByte);
  std::memcpy(bytes.mutable_data_ptr<uint8_t>(), json.data(), json.size());
  out[prefix + "." + kStateKeyPrefix + quant_type] = bytes;
  return out;
}

std::pair<at::Tensor, QuantState> QuantState::from_state_dict(
    const std::string& prefix, const std::map<std::string, at::Tensor>& tensors) {
  std::string state_key;
  for (const char* type : {"nf4", "fp4"}) {
    const std::string key = prefix + "." + kStateKeyPrefix + type;
    if (tensors.count(key)) {
      TORCH_CHECK(state_key.empty(), "bitsandbytes 4-bit state of \"", prefix,
                  "\": both nf4 and fp4 quant_state tensors are present");
      state_key = key;
    }
  }
  TORCH_CHECK(!state_key.empty(), "bitsandbytes 4-bit state of \"", prefix, "\": missing \"",
              prefix, ".", kStateKeyPrefix, "nf4\" (or fp4)");
  const nlohmann::json j = parse_state_json(state_key, tensors.at(state_key));

  QuantState st;
  st.quant_type = json_field<std::string>(j, state_key, "quant_type");
  TORCH_CHECK(
      state_key.size() >= 3 && state_key.compare(state_key.size() - 3, 3, st.quant_type) == 0, "\"",
      state_key, "\" declares quant_type \"", st.quant_type, "\"");
  st.blocksize = json_field<int64_t>(j, state_key, "blocksize");
  st.dtype = dtype_from_name(json_field<std::string>(j, state_key, "dtype"));
  st.shape = json_field<std::vector<int64_t>>(j, state_key, "shape");
  st.code = require_key(tensors, prefix + ".quant_map");
  check_code_table(prefix + ".quant_map", st.code, st.quant_type);
  st.absmax = require_key(tensors, prefix + ".absmax");
  const at::Tensor packed = require_key(tensors, prefix);

  const int64_t n = st.numel();
  const int64_t blocks = (n + st.blocksize - 1) / st.blocksize;
  const int64_t packed_bytes = packed.numel() * static_cast<int64_t>(packed.element_size());
  TORCH_CHECK(packed_bytes == (n + 1) / 2, "\"", prefix, "\" holds ", packed_bytes,
              " bytes but shape ", at::IntArrayRef(st.shape), " needs ", (n + 1) / 2);
  TORCH_CHECK(st.absmax.numel() == blocks, "\"", prefix, ".absmax\" has ", st.absmax.numel(),
              " values but ", n, " elements in blocks of ", st.blocksize, " need ", blocks);

  if (tensors.count(prefix + ".nested_absmax")) {
    NestedQuantState ns;
    ns.absmax = require_key(tensors, prefix + ".nested_absmax");
    ns.code = require_key(tensors, prefix + ".nested_quant_map");
    ns.blocksize = json_field<int64_t>(j, state_key, "nested_blocksize");
    ns.dtype = dtype_from_name(json_field<std::string>(j, state_key, "nested_dtype"));
    ns.offset = static_cast<float>(json_field<double>(j, state_key, "nested_offset"));
    TORCH_CHECK(st.absmax.scalar_type() == at::kByte, "\"", prefix,
                ".absmax\" must be uint8 when double-quantized, got ", st.absmax.scalar_type());
    TORCH_CHECK(ns.code.scalar_type() == at::kFloat && ns.code.numel() == 256, "\"", prefix,
                ".nested_quant_map\" must be 256 float32 values, got ", ns.code.scalar_type(),
                ns.code.sizes());
    const int64_t nested_blocks = (blocks + ns.blocksize - 1) / ns.blocksize;
    TORCH_CHECK(ns.absmax.scalar_type() == at::kFloat && ns.absmax.numel() == nested_blocks, "\"",
                prefix, ".nested_absmax\" must be ", nested_blocks, " float32 values, got ",
                ns.absmax.scalar_type(), ns.absmax.sizes());
    st.nested = std::move(ns);
  } else {
    TORCH_CHECK(st.absmax.scalar_type() == at::kFloat, "\"", prefix,
                ".absmax\" must be float32 (or uint8 with nested_absmax), got ",
                st.absmax.scalar_type());
  }
  return {packed, std::move(st)};
}

std::pair<at::Tensor, QuantState> quantize_4bit(const at::Tensor& A, const QuantConfig& config) {
  auto [packed, absmax] = quantize_4bit(A, config.blocksize, config.quant_type, config.storage);
  QuantState st;
  st.shape.assign(A.sizes().begin(), A.sizes().end());
  st.dtype = A.scalar_type();
  st.blocksize = config.blocksize;
  st.quant_type = config.quant_type;
  st.code = code_table_4bit(config.quant_type).to(A.device());
  st.absmax = absmax;
  if (config.double_quant && absmax.numel() > 0) {
    // bitsandbytes' compress_statistics: centre on the mean, then 8-bit
    // blockwise with the signed dynamic map in blocks of 256.
    const at::Tensor offset = absmax.mean();
    NestedQuantState ns;
    ns.code = dynamic_map(/*is_signed=*/true).to(A.device());
    std::tie(st.absmax, ns.absmax) = quantize_blockwise(absmax.sub(offset), ns.code, ns.blocksize);
    ns.offset = offset.item<float>();
    st.nested = std::move(ns);
  }
  return {packed, std::move(st)};
}

at::Tensor dequantize_4bit(const at::Tensor& packed, const QuantState& state) {
  return dequantize_4bit(packed, state.float_absmax(), state.blocksize, state.quant_type,
                         at::IntArrayRef(state.shape), state.dtype);
}

}  // namespace qlora
