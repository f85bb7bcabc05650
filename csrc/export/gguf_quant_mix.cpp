#include "export/gguf_quant_mix.h"

#include <cctype>
#include <stdexcept>

namespace qlora::exporters::detail {

namespace {

bool contains(std::string_view s, std::string_view part) {
  return s.find(part) != std::string_view::npos;
}

bool ends_with(std::string_view s, std::string_view tail) {
  return s.size() >= tail.size() && s.substr(s.size() - tail.size()) == tail;
}

// The broad roles llama.cpp's rules key on. Matched by substring in
// llama.cpp's order, which decides the rare name that fits two patterns.
enum class Role {
  kOutput,
  kTokenEmbd,
  kAttnV,
  kAttnK,
  kAttnQ,
  kAttnOut,
  kFfnUp,
  kFfnGate,
  kFfnDown,
  kOther
};

Role role_of(std::string_view name) {
  if (name == "output.weight") return Role::kOutput;
  if (name == "token_embd.weight" || name == "per_layer_token_embd.weight") {
    return Role::kTokenEmbd;
  }
  // A fused QKV and MLA's kv_b projection carry the values too: llama.cpp
  // treats them as attn_v everywhere, so its separate Q5_K/Q6_K rule for
  // attn_qkv in the M mixes is never reached.
  if (contains(name, "attn_qkv.weight") || contains(name, "attn_kv_b.weight") ||
      contains(name, "attn_v.weight")) {
    return Role::kAttnV;
  }
  if (contains(name, "attn_k.weight")) return Role::kAttnK;
  if (contains(name, "attn_q.weight")) return Role::kAttnQ;
  if (contains(name, "attn_output.weight")) return Role::kAttnOut;
  if (contains(name, "ffn_up")) return Role::kFfnUp;
  if (contains(name, "ffn_gate")) return Role::kFfnGate;
  if (contains(name, "ffn_down")) return Role::kFfnDown;
  return Role::kOther;
}

// The layers that get a bigger type in the M mixes: the first and last
// eighth, and every third layer in between.
bool use_more_bits(int32_t i, int32_t n) {
  return i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2;
}

int64_t block_size(GgmlCode type) {
  return qlora::detail::ggml_block_layout(static_cast<int32_t>(type))->block_size;
}

// llama.cpp classes an 80-layer LLaMA with grouped-query attention as the
// 70B (an 80-layer one without is the 65B); there attn_v is 8x smaller than
// attn_q, so a bigger type for it costs next to nothing.
bool is_llama_70b(const QuantMixState& s) { return s.n_layer == 80 && s.n_head != s.n_head_kv; }

// A K-quant needs rows of whole 256-element super-blocks; otherwise
// llama-quantize steps to a 32-element type at least as precise (Q5_0 for
// Q4_K, Q5_1 for Q5_K, Q8_0 for Q6_K), and to F16 when even 32 does not
// divide the row. A 32-element type (Q8_0, the output projection's type for
// such rows) goes straight to F16.
GgmlCode fit_to_rows(GgmlCode type, int64_t ne0, QuantMixState& s) {
  if (ne0 % block_size(type) == 0) return type;
  ++s.n_fallback;
  GgmlCode fallback = type;
  switch (type) {
    case GgmlCode::kQ4_K:
      fallback = GgmlCode::kQ5_0;
      break;
    case GgmlCode::kQ5_K:
      fallback = GgmlCode::kQ5_1;
      break;
    case GgmlCode::kQ6_K:
      fallback = GgmlCode::kQ8_0;
      break;
    default:
      break;
  }
  return ne0 % block_size(fallback) == 0 ? fallback : GgmlCode::kF16;
}

}  // namespace

std::optional<KQuantMix> parse_kquant_mix(std::string_view name) {
  std::string lower(name);
  for (char& c : lower) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (lower == "q4_k_s") return KQuantMix::kQ4_K_S;
  if (lower == "q4_k_m" || lower == "q4_k") return KQuantMix::kQ4_K_M;
  if (lower == "q5_k_s") return KQuantMix::kQ5_K_S;
  if (lower == "q5_k_m" || lower == "q5_k") return KQuantMix::kQ5_K_M;
  if (lower == "q6_k") return KQuantMix::kQ6_K;
  return std::nullopt;
}

const char* kquant_mix_name(KQuantMix mix) {
  switch (mix) {
    case KQuantMix::kQ4_K_S:
      return "Q4_K_S";
    case KQuantMix::kQ4_K_M:
      return "Q4_K_M";
    case KQuantMix::kQ5_K_S:
      return "Q5_K_S";
    case KQuantMix::kQ5_K_M:
      return "Q5_K_M";
    case KQuantMix::kQ6_K:
      return "Q6_K";
  }
  return "?";
}

uint32_t file_type_of(KQuantMix mix) { return static_cast<uint32_t>(mix); }

GgmlCode base_type_of(KQuantMix mix) {
  switch (mix) {
    case KQuantMix::kQ4_K_S:
    case KQuantMix::kQ4_K_M:
      return GgmlCode::kQ4_K;
    case KQuantMix::kQ5_K_S:
    case KQuantMix::kQ5_K_M:
      return GgmlCode::kQ5_K;
    case KQuantMix::kQ6_K:
      return GgmlCode::kQ6_K;
  }
  return GgmlCode::kQ6_K;
}

QuantMixState make_quant_mix_state(int32_t n_layer, int32_t n_head, int32_t n_head_kv,
                                   const std::vector<std::string>& tensor_names) {
  QuantMixState s;
  s.n_layer = n_layer;
  s.n_head = n_head;
  s.n_head_kv = n_head_kv;
  for (const std::string& name : tensor_names) {
    const Role role = role_of(name);
    if (role == Role::kAttnV) ++s.n_attn_v;
    if (role == Role::kOutput) s.has_output = true;
  }
  return s;
}

bool quant_mix_quantizes(std::string_view name, int n_dims) {
  if (n_dims < 2) return false;  // norms, rope_freqs, biases
  if (!ends_with(name, "weight")) return false;
  // 2-D weights llama.cpp keeps as they are: any norm, and the MoE router.
  // Its other exceptions concern tensors the llama architecture does not
  // have (position embeddings, RWKV, Mamba, vision and audio towers).
  return !contains(name, "_norm.weight") && !contains(name, "ffn_gate_inp.weight");
}

GgmlCode choose_type(KQuantMix mix, std::string_view name, int64_t ne0, int n_dims,
                     QuantMixState& s) {
  if (!quant_mix_quantizes(name, n_dims)) return GgmlCode::kF32;
  if (n_dims > 2) {
    throw std::invalid_argument("K-quant export: tensor '" + std::string(name) + "' is a " +
                                std::to_string(n_dims) +
                                "-D expert tensor; mixture-of-experts mixes are not supported");
  }
  const bool m_mix = mix == KQuantMix::kQ4_K_M || mix == KQuantMix::kQ5_K_M;
  GgmlCode type = base_type_of(mix);
  switch (role_of(name)) {
    case Role::kTokenEmbd:
      if (s.has_output) break;  // its own tensor: the base type
      [[fallthrough]];          // tied: it is the output projection too
    case Role::kOutput:
      // Q6_K in every K mix, whatever the base type; rows that are not
      // whole super-blocks go to Q8_0 (what Q6_K would fall back to), and
      // on to F16 when 32 does not divide them either.
      type = ne0 % block_size(type) != 0 ? GgmlCode::kQ8_0 : GgmlCode::kQ6_K;
      break;
    case Role::kAttnV:
      // The value projection is small (n_head_kv / n_head of attn_q with
      // grouped-query attention), so extra bits on it cost little.
      if (m_mix && use_more_bits(s.i_attn_v, s.n_attn_v)) {
        type = GgmlCode::kQ6_K;
      } else if (mix == KQuantMix::kQ4_K_S && s.i_attn_v < 4) {
        type = GgmlCode::kQ5_K;
      }
      if (is_llama_70b(s) && type == GgmlCode::kQ4_K) type = GgmlCode::kQ5_K;
      ++s.i_attn_v;
      break;
    case Role::kFfnDown:
      // Spread over block_count, not over the ffn_down tensors seen.
      if (m_mix && use_more_bits(s.i_ffn_down, s.n_layer)) {
        type = GgmlCode::kQ6_K;
      } else if (mix == KQuantMix::kQ4_K_S && s.i_ffn_down < s.n_layer / 8) {
        type = GgmlCode::kQ5_K;
      }
      ++s.i_ffn_down;
      break;
    default:
      // attn_q/k/output and ffn_gate/up: only other mixes (Q2_K, Q3_K_*,
      // the IQ types) or MoE models change these.
      break;
  }
  return fit_to_rows(type, ne0, s);
}

}  // namespace qlora::exporters::detail
