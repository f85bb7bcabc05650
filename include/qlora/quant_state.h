// QuantState: everything needed to dequantize a 4-bit weight, in the shape
// bitsandbytes gives it (and writes into Hugging Face safetensors files), so
// checkpoints move between the two libraries in both directions.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "qlora/code_tables.h"

namespace qlora {

// Second-level ("double") quantization of the per-block absmax values:
// absmax - offset quantized blockwise to 8 bits with the signed dynamic map.
struct NestedQuantState {
  at::Tensor absmax;  // float32 [ceil(n_blocks / blocksize)]
  at::Tensor code;    // float32 [256], the signed dynamic map
  int64_t blocksize = 256;
  float offset = 0.f;  // mean of the first-level absmax
  at::ScalarType dtype = at::kFloat;
};

struct QuantState {
  at::Tensor absmax;  // float32 [n_blocks], or uint8 [n_blocks] when nested
  std::vector<int64_t> shape;
  at::Tensor code;                    // float32 [16]: the NF4 or FP4 table
  at::ScalarType dtype = at::kFloat;  // dtype of the original tensor
  int64_t blocksize = 64;
  std::string quant_type = "nf4";
  std::optional<NestedQuantState> nested;

  int64_t numel() const;
  // First-level absmax as float32, undoing double quantization when present
  // (code8[q] * nested_absmax[i / 256] + offset, in bitsandbytes' order).
  at::Tensor float_absmax() const;

  // Hugging Face / bitsandbytes serialisation of a Linear's weight under
  // `prefix` (e.g. "model.layers.0.mlp.up_proj.weight"): the keys
  // prefix, prefix.absmax, prefix.quant_map, [prefix.nested_absmax,
  // prefix.nested_quant_map], prefix.quant_state.bitsandbytes__<type>.
  std::map<std::string, at::Tensor> to_state_dict(const std::string& prefix,
                                                  const at::Tensor& packed) const;
  // Inverse of to_state_dict; `tensors` may hold other keys too. Errors name
  // the missing or malformed key.
  static std::pair<at::Tensor, QuantState> from_state_dict(
      const std::string& prefix, const std::map<std::string, at::Tensor>& tensors);

  // The JSON bitsandbytes packs into the quant_state.bitsandbytes__* tensor.
  std::string to_json() const;
};

struct QuantConfig {
  int64_t blocksize = 64;
  std::string quant_type = "nf4";
  bool double_quant = false;
  at::ScalarType storage = at::kByte;
};

// quantize_4bit with bitsandbytes' compress_statistics semantics.
std::pair<at::Tensor, QuantState> quantize_4bit(const at::Tensor& A, const QuantConfig& config);
at::Tensor dequantize_4bit(const at::Tensor& packed, const QuantState& state);

std::string dtype_name(at::ScalarType dtype);  // "bfloat16", as bitsandbytes writes it
at::ScalarType dtype_from_name(const std::string& name);

}  // namespace qlora
