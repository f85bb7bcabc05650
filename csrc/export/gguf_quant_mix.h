// The per-tensor types of llama.cpp's K-quant file types (Q4_K_S, Q4_K_M,
// Q5_K_S, Q5_K_M, Q6_K) for the "llama" architecture: the type
// `llama-quantize` (src/llama-quant.cpp) gives each tensor of a dense LLaMA
// GGUF when run without an importance matrix, tensor-type overrides,
// --pure or --leave-output-tensor. With these choices (and the encoders of
// io/ggml_kquants.h and io/ggml_legacy_quants.h) every tensor of a quantized
// export gets the type and the bytes llama-quantize gives it when it
// quantizes our F32 export; checked against the llama.cpp that
// llama-cpp-python 0.3.36 bundles (tests/python/test_gguf_quant_mix.py).
// Torch-free.
//
// Use: build a QuantMixState from the model's hyper-parameters and the names
// of all tensors the file will hold, then call choose_type once per tensor
// with the same state, visiting the blocks in ascending layer order (within
// a block any order): like llama.cpp, the layer rules count attn_v and
// ffn_down tensors as they come rather than parsing layer numbers.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "common/ggml_blocks.h"

namespace qlora::exporters::detail {

using GgmlCode = qlora::detail::GgmlCode;

// The mixes, numbered as llama.cpp's enum llama_ftype.
enum class KQuantMix : int32_t {
  kQ4_K_S = 14,
  kQ4_K_M = 15,
  kQ5_K_S = 16,
  kQ5_K_M = 17,
  kQ6_K = 18,
};

// "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k", in any case, plus the
// aliases llama-quantize accepts: "q4_k" is Q4_K_M and "q5_k" is Q5_K_M
// (there is no Q6_K_S / Q6_K_M). nullopt for anything else.
std::optional<KQuantMix> parse_kquant_mix(std::string_view name);

// llama.cpp's name of the mix: "Q4_K_M".
const char* kquant_mix_name(KQuantMix mix);

// The value llama-quantize writes to general.file_type: the llama_ftype.
uint32_t file_type_of(KQuantMix mix);

// The type most tensors get: Q4_K, Q5_K or Q6_K.
GgmlCode base_type_of(KQuantMix mix);

// What the rules need to know of the model, and the counters they keep.
struct QuantMixState {
  int32_t n_layer = 0;    // llama.block_count
  int32_t n_head = 0;     // llama.attention.head_count
  int32_t n_head_kv = 0;  // llama.attention.head_count_kv
  // Tensors that count as attn_v (names containing attn_v.weight,
  // attn_qkv.weight or attn_kv_b.weight): the layer rule for attn_v spreads
  // over these rather than over n_layer.
  int32_t n_attn_v = 0;
  // Whether the file has an output.weight; without one token_embd doubles
  // as the output projection and gets the output tensor's type.
  bool has_output = false;

  // Advanced by choose_type.
  int32_t i_attn_v = 0;
  int32_t i_ffn_down = 0;
  int32_t n_fallback = 0;  // tensors whose rows forced a fallback type
};

// The state for a model with these hyper-parameters whose file holds
// `tensor_names` (all of them, in any order).
QuantMixState make_quant_mix_state(int32_t n_layer, int32_t n_head, int32_t n_head_kv,
                                   const std::vector<std::string>& tensor_names);

// Whether llama-quantize quantizes the tensor at all: 2-D (or 3-D) tensors
// whose name ends in "weight", norms and MoE router weights excepted.
bool quant_mix_quantizes(std::string_view name, int n_dims);

// The type of tensor `name` (ne0 elements per row, n_dims dimensions) in
// `mix`. Tensors llama-quantize leaves alone get kF32: it copies them as
// they come, and converters write 1-D tensors (norms, rope_freqs) as F32.
// Rows that do not fit the chosen type fall back as llama-quantize does:
// Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, and F16 where 32 does not
// divide the row either. Throws std::invalid_argument for 3-D (MoE expert)
// tensors: mixture-of-experts models follow other rules (keyed on the
// expert count), which this does not implement.
GgmlCode choose_type(KQuantMix mix, std::string_view name, int64_t ne0, int n_dims,
                     QuantMixState& state);

}  // namespace qlora::exporters::detail
