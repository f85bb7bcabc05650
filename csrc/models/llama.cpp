#include "qlora/models/llama.h"

#include "qlora/nn/linear_cross_entropy.h"
#include "qlora/nn/recompute_tape.h"
#include "util/rng_state.h"

#include <ATen/Context.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/cross_entropy_loss.h>
#include <ATen/ops/cummax.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/isin.h>
#include <ATen/ops/multinomial.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/scaled_dot_product_attention.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cmath>
#include <limits>
#include <mutex>

namespace qlora::models {

namespace {

std::string join(const std::string& prefix, const std::string& name) {
  return prefix.empty() ? name : prefix + "." + name;
}

// A Linear that adopts given tensors as its parameters. LinearImpl's own
// constructor allocates and initialises a weight; building it 1x1 and then
// swapping the registered tensors avoids that cost for every loaded layer.
class AdoptingLinearImpl : public torch::nn::LinearImpl {
 public:
  AdoptingLinearImpl(const at::Tensor& w, const std::optional<at::Tensor>& b)
      : LinearImpl(torch::nn::LinearOptions(1, 1).bias(b.has_value())) {
    TORCH_CHECK(w.dim() == 2, "make_linear: weight must be [out, in], got ", w.sizes());
    options.in_features(w.size(1)).out_features(w.size(0));
    weight = adopt("weight", w);
    if (b) {
      TORCH_CHECK(b->dim() == 1 && b->size(0) == w.size(0), "make_linear: bias must be [",
                  w.size(0), "], got ", b->sizes());
      bias = adopt("bias", *b);
    }
  }

 private:
  at::Tensor adopt(const std::string& name, at::Tensor t) {
    if (!t.requires_grad()) t.requires_grad_(true);  // as register_parameter would
    parameters_[name] = t;
    return t;
  }
};

at::Tensor rotate_half(const at::Tensor& x) {
  const int64_t half = x.size(-1) / 2;
  return at::cat({x.narrow(-1, half, half).neg(), x.narrow(-1, 0, half)}, -1);
}

// [B, kv_heads, S, D] -> [B, kv_heads * n_rep, S, D], each KV head repeated
// for the n_rep query heads of its group (transformers' repeat_kv).
at::Tensor repeat_kv(const at::Tensor& x, int64_t n_rep) {
  if (n_rep == 1) return x;
  const auto s = x.sizes();
  return x.unsqueeze(2)
      .expand({s[0], s[1], n_rep, s[2], s[3]})
      .reshape({s[0], s[1] * n_rep, s[2], s[3]});
}

// [1, heads, n, D] of the real tokens -> [B, heads, T, D] of the padded
// batch, zeros at the padding (keys there are masked, queries discarded).
at::Tensor to_padded(const at::Tensor& t, const LayerInputs& in) {
  const int64_t heads = t.size(1), n = t.size(2), D = t.size(3);
  const at::Tensor rows = t.squeeze(0).transpose(0, 1).reshape({n, heads * D});
  return at::zeros({in.padded_batch * in.padded_len, heads * D}, t.options())
      .index_copy(0, in.token_index, rows)
      .view({in.padded_batch, in.padded_len, heads, D})
      .transpose(1, 2);
}

// Positions restarting at 0 at each change of segment id along a row.
at::Tensor segment_positions(const at::Tensor& segment_ids) {
  const int64_t B = segment_ids.size(0), T = segment_ids.size(1);
  const at::Tensor idx =
      at::arange(T, segment_ids.options().dtype(at::kLong)).unsqueeze(0).expand({B, T});
  at::Tensor starts = at::ones({B, T}, segment_ids.options().dtype(at::kBool));
  if (T > 1)
    starts.narrow(1, 1, T - 1)
        .copy_(segment_ids.narrow(1, 1, T - 1) != segment_ids.narrow(1, 0, T - 1));
  const at::Tensor start_index = std::get<0>(at::cummax(at::where(starts, idx, 0), 1));
  return idx - start_index;
}

// ---- Gradient checkpointing ------------------------------------------------

using util::RngState;

// What backward needs to run a decoder layer again.
struct CheckpointCall : torch::CustomClassHolder {
  LlamaDecoderLayer layer{nullptr};
  LayerInputs inputs;              // cos/sin/mask never require grad
  std::vector<at::Tensor> params;  // the layer's trainable parameters
  RngState rng;
  bool keep_frozen_matmuls = false;
  nn::RecomputeTape tape;  // their outputs, with keep_frozen_matmuls
};

// Runs a decoder layer without recording its graph and runs it again, with
// the same RNG state, when its gradient is needed. The layer's trainable
// parameters are inputs of the Function, so its output requires grad even
// when the incoming hidden state does not (frozen embeddings under LoRA),
// and their gradients are returned, not accumulated behind the engine's back.
class CheckpointedLayer : public torch::autograd::Function<CheckpointedLayer> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& hidden,
                            at::TensorList /*params*/, c10::intrusive_ptr<CheckpointCall> call) {
    call->rng = RngState::capture(hidden.device());
    ctx->save_for_backward({hidden});
    ctx->saved_data["call"] = c10::IValue::make_capsule(call);
    at::NoGradGuard no_grad;
    if (!call->keep_frozen_matmuls) return call->layer->forward(hidden, call->inputs);
    nn::TapeScope recording(call->tape, nn::TapeScope::Mode::kRecord);
    return call->layer->forward(hidden, call->inputs);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_out) {
    auto call =
        c10::static_intrusive_pointer_cast<CheckpointCall>(ctx->saved_data["call"].toCapsule());
    const bool hidden_grad = ctx->needs_input_grad(0);
    const at::Tensor hidden = ctx->get_saved_variables()[0].detach().requires_grad_(hidden_grad);
    at::Tensor out;
    {
      const RngState now = RngState::capture(hidden.device());
      call->rng.restore();
      at::AutoGradMode enable(true);
      if (call->keep_frozen_matmuls) {
        nn::TapeScope replaying(call->tape, nn::TapeScope::Mode::kReplay);
        out = call->layer->forward(hidden, call->inputs);
        TORCH_CHECK(call->tape.fully_replayed(), "selective recomputation: the layer recorded ",
                    call->tape.size(), " 4-bit matmuls but its recomputation used fewer");
      } else {
        out = call->layer->forward(hidden, call->inputs);
      }
      now.restore();  // the recomputation leaves the caller's RNG stream untouched
    }
    call->tape.clear();  // the recomputed graph holds what it still needs
    torch::autograd::variable_list wrt;
    std::vector<size_t> slot;  // position of each wrt entry in the result
    if (hidden_grad) wrt.push_back(hidden), slot.push_back(0);
    for (size_t i = 0; i < call->params.size(); ++i)
      if (ctx->needs_input_grad(1 + i)) wrt.push_back(call->params[i]), slot.push_back(1 + i);
    // One entry per forward argument: hidden, each parameter, the call.
    torch::autograd::variable_list result(call->params.size() + 2);
    if (wrt.empty() || !grad_out[0].defined() || !out.requires_grad()) return result;
    const auto grads = torch::autograd::grad({out}, wrt, {grad_out[0]}, /*retain_graph=*/false,
                                             /*create_graph=*/false, /*allow_unused=*/true);
    for (size_t i = 0; i < grads.size(); ++i) result[slot[i]] = grads[i];
    return result;
  }
};

// ---- Generation --------------------------------------------------------------

void check_generation(const GenerationConfig& g) {
  TORCH_CHECK(g.max_new_tokens >= 0, "generate: max_new_tokens must be >= 0, got ",
              g.max_new_tokens);
  TORCH_CHECK(g.temperature >= 0, "generate: temperature must be >= 0, got ", g.temperature);
  TORCH_CHECK(g.top_k >= 0, "generate: top_k must be >= 0, got ", g.top_k);
  TORCH_CHECK(g.top_p > 0 && g.top_p <= 1, "generate: top_p must be in (0, 1], got ", g.top_p);
}

// transformers' TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
// and multinomial sampling, on the CPU with a seeded generator.
at::Tensor sample(const at::Tensor& logits, const GenerationConfig& g, at::Generator& gen) {
  const double neg_inf = -std::numeric_limits<double>::infinity();
  at::Tensor scores = logits.to(at::kCPU) / g.temperature;
  const int64_t V = scores.size(-1);
  if (g.top_k > 0 && g.top_k < V) {
    const at::Tensor kth = std::get<0>(scores.topk(g.top_k, -1)).narrow(-1, g.top_k - 1, 1);
    scores = scores.masked_fill(scores < kth, neg_inf);
  }
  if (g.top_p < 1.0) {
    auto [sorted, order] = scores.sort(-1, /*descending=*/false);
    at::Tensor remove = sorted.softmax(-1).cumsum(-1) <= (1 - g.top_p);
    remove.narrow(-1, V - 1, 1).fill_(false);  // keep at least the most likely token
    scores = scores.masked_fill(remove.scatter(-1, order, remove), neg_inf);
  }
  return at::multinomial(scores.softmax(-1), 1, false, gen).squeeze(-1);
}

}  // namespace

torch::nn::Linear make_linear(const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  return torch::nn::Linear(
      std::shared_ptr<torch::nn::LinearImpl>(std::make_shared<AdoptingLinearImpl>(weight, bias)));
}

// ---- RandomLlamaWeights --------------------------------------------------------

RandomLlamaWeights::RandomLlamaWeights(const LlamaConfig& config, at::TensorOptions options)
    : config_(config), options_(options) {}

std::shared_ptr<torch::nn::Module> RandomLlamaWeights::linear(const std::string&,
                                                              int64_t in_features,
                                                              int64_t out_features, bool bias) {
  at::NoGradGuard no_grad;
  at::Tensor w = at::empty({out_features, in_features}, options_);
  w.normal_(0.0, config_.initializer_range);
  std::optional<at::Tensor> b;
  if (bias) b = at::zeros({out_features}, options_);
  return make_linear(w, b).ptr();
}

at::Tensor RandomLlamaWeights::tensor(const std::string& name, at::IntArrayRef shape) {
  at::NoGradGuard no_grad;
  if (name != "model.embed_tokens.weight") return at::ones(shape, options_);  // RMSNorm
  at::Tensor w = at::empty(shape, options_);
  w.normal_(0.0, config_.initializer_range);
  const auto pad = config_.pad_token_id;
  if (pad && *pad >= 0 && *pad < shape[0]) w[*pad].zero_();
  return w;
}

// ---- KVCache -------------------------------------------------------------------

std::pair<at::Tensor, at::Tensor> KVCache::append(int64_t layer, const at::Tensor& k,
                                                  const at::Tensor& v) {
  TORCH_CHECK(layer >= 0, "KVCache: bad layer ", layer);
  if (static_cast<size_t>(layer) >= keys.size()) {
    keys.resize(layer + 1);
    values.resize(layer + 1);
  }
  at::Tensor& K = keys[layer];
  at::Tensor& V = values[layer];
  const int64_t T = k.size(2), needed = length + T;
  if (!K.defined()) {
    TORCH_CHECK(length == 0, "KVCache: layer ", layer, " has no entries but length is ", length);
  } else {
    TORCH_CHECK(K.size(2) >= length, "KVCache: layer ", layer, " holds ", K.size(2),
                " positions, fewer than length ", length);
  }
  if (at::GradMode::is_enabled()) {  // no in-place writes into tensors autograd may have saved
    K = K.defined() ? at::cat({K.narrow(2, 0, length), k}, 2) : k;
    V = V.defined() ? at::cat({V.narrow(2, 0, length), v}, 2) : v;
    return {K, V};
  }
  if (!K.defined() || K.size(2) < needed) {  // grow geometrically: amortised O(1) appends
    const int64_t capacity = std::max<int64_t>(needed, K.defined() ? 2 * K.size(2) : needed);
    at::Tensor K2 = at::empty({k.size(0), k.size(1), capacity, k.size(3)}, k.options());
    at::Tensor V2 = at::empty({v.size(0), v.size(1), capacity, v.size(3)}, v.options());
    if (length > 0) {
      K2.narrow(2, 0, length).copy_(K.narrow(2, 0, length));
      V2.narrow(2, 0, length).copy_(V.narrow(2, 0, length));
    }
    K = K2;
    V = V2;
  }
  K.narrow(2, length, T).copy_(k);
  V.narrow(2, length, T).copy_(v);
  return {K.narrow(2, 0, needed), V.narrow(2, 0, needed)};
}

void KVCache::clear() {
  keys.clear();
  values.clear();
  key_mask = at::Tensor();
  length = 0;
}

// ---- Modules ---------------------------------------------------------------------

LlamaRMSNormImpl::LlamaRMSNormImpl(const at::Tensor& w, double eps) : eps_(eps) {
  TORCH_CHECK(w.dim() == 1, "LlamaRMSNorm: weight must be 1-D, got ", w.sizes());
  weight = register_parameter("weight", w);
}

at::Tensor LlamaRMSNormImpl::forward(const at::Tensor& x) {
  const at::Tensor h = x.to(at::kFloat);
  const at::Tensor variance = h.pow(2).mean(-1, /*keepdim=*/true);
  return weight * (h * (variance + eps_).rsqrt()).to(x.scalar_type());
}

void LlamaRMSNormImpl::pretty_print(std::ostream& stream) const {
  stream << "qlora::models::LlamaRMSNorm(" << weight.size(0) << ", eps=" << eps_ << ")";
}

LlamaAttentionImpl::LlamaAttentionImpl(const LlamaConfig& c, int64_t layer_idx,
                                       LlamaWeightSource& weights, const std::string& prefix)
    : layer_idx_(layer_idx),
      num_heads_(c.num_attention_heads),
      num_kv_heads_(c.num_key_value_heads),
      head_dim_(c.attention_head_dim()),
      dropout_(c.attention_dropout) {
  const int64_t H = c.hidden_size, q_out = num_heads_ * head_dim_,
                kv_out = num_kv_heads_ * head_dim_;
  register_linear("q_proj", weights.linear(join(prefix, "q_proj"), H, q_out, c.qkv_bias()), q_proj);
  register_linear("k_proj", weights.linear(join(prefix, "k_proj"), H, kv_out, c.qkv_bias()),
                  k_proj);
  register_linear("v_proj", weights.linear(join(prefix, "v_proj"), H, kv_out, c.qkv_bias()),
                  v_proj);
  register_linear("o_proj", weights.linear(join(prefix, "o_proj"), q_out, H, c.o_proj_bias()),
                  o_proj);
}

at::Tensor LlamaAttentionImpl::forward(const at::Tensor& x, const LayerInputs& in) {
  const int64_t B = x.size(0), T = x.size(1);
  at::Tensor q = q_proj(x).view({B, T, num_heads_, head_dim_}).transpose(1, 2);
  at::Tensor k = k_proj(x).view({B, T, num_kv_heads_, head_dim_}).transpose(1, 2);
  at::Tensor v = v_proj(x).view({B, T, num_kv_heads_, head_dim_}).transpose(1, 2);
  const at::Tensor cos = in.cos.unsqueeze(1), sin = in.sin.unsqueeze(1);
  q = q * cos + rotate_half(q) * sin;
  k = k * cos + rotate_half(k) * sin;
  if (in.cache) std::tie(k, v) = in.cache->append(layer_idx_, k, v);
  const bool unpadded = in.token_index.defined();
  if (unpadded) {
    q = to_padded(q, in);
    k = to_padded(k, in);
    v = to_padded(v, in);
  }
  const int64_t n_rep = num_heads_ / num_kv_heads_;
  const at::Tensor out =
      at::scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), in.mask,
                                       is_training() ? dropout_ : 0.0, in.causal);
  const int64_t width = num_heads_ * head_dim_;
  if (!unpadded) return o_proj(out.transpose(1, 2).reshape({B, T, width}));
  return o_proj(out.transpose(1, 2)
                    .reshape({in.padded_batch * in.padded_len, width})
                    .index_select(0, in.token_index)
                    .unsqueeze(0));
}

LlamaMLPImpl::LlamaMLPImpl(const LlamaConfig& c, LlamaWeightSource& weights,
                           const std::string& prefix) {
  const int64_t H = c.hidden_size, I = c.intermediate_size;
  const bool bias = c.has_mlp_bias();
  register_linear("gate_proj", weights.linear(join(prefix, "gate_proj"), H, I, bias), gate_proj);
  register_linear("up_proj", weights.linear(join(prefix, "up_proj"), H, I, bias), up_proj);
  register_linear("down_proj", weights.linear(join(prefix, "down_proj"), I, H, bias), down_proj);
}

at::Tensor LlamaMLPImpl::forward(const at::Tensor& x) {
  return down_proj(at::silu(gate_proj(x)) * up_proj(x));
}

LlamaDecoderLayerImpl::LlamaDecoderLayerImpl(const LlamaConfig& c, int64_t layer_idx,
                                             LlamaWeightSource& weights,
                                             const std::string& prefix) {
  self_attn = register_module("self_attn",
                              LlamaAttention(c, layer_idx, weights, join(prefix, "self_attn")));
  mlp = register_module("mlp", LlamaMLP(c, weights, join(prefix, "mlp")));
  const int64_t H = c.hidden_size;
  input_layernorm = register_module(
      "input_layernorm",
      LlamaRMSNorm(weights.tensor(join(prefix, "input_layernorm.weight"), {H}), c.rms_norm_eps));
  post_attention_layernorm = register_module(
      "post_attention_layernorm",
      LlamaRMSNorm(weights.tensor(join(prefix, "post_attention_layernorm.weight"), {H}),
                   c.rms_norm_eps));
}

at::Tensor LlamaDecoderLayerImpl::forward(const at::Tensor& x, const LayerInputs& in) {
  const at::Tensor h = x + self_attn(input_layernorm(x), in);
  return h + mlp(post_attention_layernorm(h));
}

LlamaModelImpl::LlamaModelImpl(const LlamaConfig& c, LlamaWeightSource& weights) : config_(c) {
  const int64_t V = c.vocab_size, H = c.hidden_size;
  auto options = torch::nn::EmbeddingOptions(V, H)._weight(
      weights.tensor("model.embed_tokens.weight", {V, H}));
  if (c.pad_token_id && *c.pad_token_id >= 0 && *c.pad_token_id < V)
    options.padding_idx(*c.pad_token_id);  // as nn.Embedding(padding_idx=pad_token_id) in HF
  embed_tokens = register_module("embed_tokens", torch::nn::Embedding(options));
  layers = register_module("layers", torch::nn::ModuleList());
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    LlamaDecoderLayer layer(c, i, weights, "model.layers." + std::to_string(i));
    layers->push_back(layer);
    layer_list_.push_back(layer);
  }
  norm = register_module("norm",
                         LlamaRMSNorm(weights.tensor("model.norm.weight", {H}), c.rms_norm_eps));
  inv_freq_ = c.rope_inv_freq();
}

LayerInputs LlamaModelImpl::layer_inputs(const at::Tensor& positions, const at::Tensor& key_mask,
                                         const std::optional<at::Tensor>& segment_ids, int64_t past,
                                         int64_t T, at::ScalarType dtype, KVCache* cache) {
  LayerInputs in;
  in.cache = cache;
  // HF LlamaRotaryEmbedding: float32 angles, cos/sin cast to the hidden dtype.
  if (inv_freq_.device() != positions.device()) inv_freq_ = inv_freq_.to(positions.device());
  const at::Tensor freqs = positions.unsqueeze(-1).to(at::kFloat) * inv_freq_;
  const at::Tensor emb = at::cat({freqs, freqs}, -1);
  in.cos = emb.cos().to(dtype);
  in.sin = emb.sin().to(dtype);

  const bool padded = key_mask.defined() && !key_mask.all().item<bool>();
  if (!padded && !segment_ids) {
    if (past == 0) {  // plain causal: SDPA's own mask (lets CUDA pick flash attention)
      in.causal = T > 1;
      return in;
    }
    if (T == 1) return in;  // one new token sees every cached one
  }
  const auto long_opts = positions.options().dtype(at::kLong);
  const at::Tensor q_pos = at::arange(past, past + T, long_opts).unsqueeze(1);
  const at::Tensor k_pos = at::arange(past + T, long_opts).unsqueeze(0);
  at::Tensor allowed = (k_pos <= q_pos).unsqueeze(0);  // [1, T, S]
  if (padded) allowed = allowed.logical_and(key_mask.unsqueeze(1));
  if (segment_ids)
    allowed = allowed.logical_and(segment_ids->unsqueeze(2) == segment_ids->unsqueeze(1));
  // A query with nothing to attend (a left-padding position) attends to itself,
  // so SDPA never softmaxes an empty row into NaN; its output is never used.
  const at::Tensor empty_row = allowed.any(-1, /*keepdim=*/true).logical_not();
  allowed = allowed.logical_or(empty_row.logical_and(k_pos == q_pos));
  in.mask = allowed.unsqueeze(1);
  return in;
}

at::Tensor LlamaModelImpl::run_layer(size_t i, const at::Tensor& hidden, const LayerInputs& in) {
  LlamaDecoderLayer layer = layer_list_[i];
  if (!gradient_checkpointing_ || !at::GradMode::is_enabled() || in.cache)
    return layer->forward(hidden, in);
  auto call = c10::make_intrusive<CheckpointCall>();
  call->layer = layer;
  call->inputs = in;
  call->keep_frozen_matmuls = keep_frozen_matmuls_;
  for (const at::Tensor& p : layer->parameters())
    if (p.requires_grad()) call->params.push_back(p);
  if (!hidden.requires_grad() && call->params.empty()) return layer->forward(hidden, in);
  return CheckpointedLayer::apply(hidden, at::TensorList(call->params), call);
}

at::Tensor LlamaModelImpl::forward(const at::Tensor& input_ids,
                                   const std::optional<at::Tensor>& attention_mask,
                                   const std::optional<at::Tensor>& position_ids, KVCache* cache,
                                   const std::optional<at::Tensor>& segment_ids) {
  TORCH_CHECK(input_ids.dim() == 2 && input_ids.scalar_type() == at::kLong,
              "Llama forward: input_ids must be int64 [batch, seq], got ", input_ids.scalar_type(),
              " ", input_ids.sizes());
  const int64_t B = input_ids.size(0), T = input_ids.size(1);
  const int64_t past = cache ? cache->length : 0, S = past + T;
  const auto dev = input_ids.device();
  const auto bool_opts = input_ids.options().dtype(at::kBool);
  TORCH_CHECK(!(segment_ids && cache),
              "Llama forward: segment_ids (packed sequences) cannot be "
              "combined with a KV cache");
  std::optional<at::Tensor> seg;
  if (segment_ids) {
    TORCH_CHECK(segment_ids->sizes() == input_ids.sizes(), "Llama forward: segment_ids must be ",
                input_ids.sizes(), " like input_ids, got ", segment_ids->sizes());
    seg = segment_ids->to(dev);
  }

  // Which keys (past and new) are real tokens.
  at::Tensor key_mask;
  const at::Tensor past_mask = cache && cache->key_mask.defined() ? cache->key_mask
                               : past > 0                         ? at::ones({B, past}, bool_opts)
                                                                  : at::Tensor();
  if (attention_mask) {
    const at::Tensor m = attention_mask->to(dev, at::kBool);
    TORCH_CHECK(m.dim() == 2 && m.size(0) == B && (m.size(1) == S || m.size(1) == T),
                "Llama forward: attention_mask must be [", B, ", ", T, "] or [", B, ", ", S,
                "] (past + new tokens), got ", attention_mask->sizes());
    key_mask = m.size(1) == S || !past_mask.defined() ? m : at::cat({past_mask, m}, 1);
  } else if (cache && cache->key_mask.defined()) {
    key_mask = at::cat({cache->key_mask, at::ones({B, T}, bool_opts)}, 1);
  }

  at::Tensor positions;
  if (position_ids) {
    TORCH_CHECK(position_ids->dim() == 2 && position_ids->size(1) == T &&
                    (position_ids->size(0) == B || position_ids->size(0) == 1),
                "Llama forward: position_ids must be [", B, ", ", T, "], got ",
                position_ids->sizes());
    positions = position_ids->to(dev, at::kLong).expand({B, T});
  } else if (seg) {
    positions = segment_positions(*seg);
  } else {
    positions =
        at::arange(past, S, input_ids.options().dtype(at::kLong)).unsqueeze(0).expand({B, T});
  }

  at::Tensor hidden = embed_tokens(input_ids);
  const LayerInputs in =
      layer_inputs(positions, key_mask, seg, past, T, hidden.scalar_type(), cache);
  for (size_t i = 0; i < layer_list_.size(); ++i) hidden = run_layer(i, hidden, in);
  if (cache) {
    cache->length = S;
    if (key_mask.defined()) cache->key_mask = key_mask;
  }
  return norm(hidden);
}

at::Tensor LlamaModelImpl::forward_unpadded(const at::Tensor& input_ids,
                                            const at::Tensor& token_index,
                                            const at::Tensor& attention_mask,
                                            const at::Tensor& positions) {
  TORCH_CHECK(input_ids.dim() == 2 && attention_mask.sizes() == input_ids.sizes() &&
                  positions.sizes() == input_ids.sizes() && token_index.dim() == 1,
              "Llama forward_unpadded: input_ids, attention_mask and positions must be [B, T] "
              "and token_index 1-D, got ",
              input_ids.sizes(), ", ", attention_mask.sizes(), ", ", positions.sizes(), ", ",
              token_index.sizes());
  const int64_t B = input_ids.size(0), T = input_ids.size(1);
  at::Tensor hidden =
      embed_tokens(input_ids.reshape({-1}).index_select(0, token_index)).unsqueeze(0);
  LayerInputs in = layer_inputs(positions, attention_mask.to(at::kBool), std::nullopt, 0, T,
                                hidden.scalar_type(), nullptr);
  auto pack = [&](const at::Tensor& t) {
    return t.reshape({B * T, t.size(-1)}).index_select(0, token_index).unsqueeze(0);
  };
  in.cos = pack(in.cos);
  in.sin = pack(in.sin);
  in.token_index = token_index;
  in.padded_batch = B;
  in.padded_len = T;
  for (size_t i = 0; i < layer_list_.size(); ++i) hidden = run_layer(i, hidden, in);
  return norm(hidden);
}

// ---- LlamaForCausalLM ------------------------------------------------------------

LlamaForCausalLMImpl::LlamaForCausalLMImpl(const LlamaConfig& config) : config_(config) {
  RandomLlamaWeights weights(config);
  build(weights);
}

LlamaForCausalLMImpl::LlamaForCausalLMImpl(const LlamaConfig& config, LlamaWeightSource& weights)
    : config_(config) {
  build(weights);
}

void LlamaForCausalLMImpl::build(LlamaWeightSource& weights) {
  config_.validate();
  model = register_module("model", LlamaModel(config_, weights));
  std::shared_ptr<torch::nn::Module> head =
      config_.tie_word_embeddings
          ? make_linear(model->embed_tokens->weight).ptr()  // the same tensor: tied
          : weights.linear("lm_head", config_.hidden_size, config_.vocab_size, false);
  register_linear("lm_head", head, lm_head);
}

at::Tensor LlamaForCausalLMImpl::forward(const at::Tensor& input_ids,
                                         const std::optional<at::Tensor>& attention_mask,
                                         const std::optional<at::Tensor>& position_ids,
                                         KVCache* cache,
                                         const std::optional<at::Tensor>& segment_ids) {
  return lm_head(model->forward(input_ids, attention_mask, position_ids, cache, segment_ids))
      .to(at::kFloat);
}

at::Tensor LlamaForCausalLMImpl::summed_loss(const at::Tensor& input_ids, const at::Tensor& labels,
                                             const std::optional<at::Tensor>& attention_mask,
                                             const std::optional<at::Tensor>& position_ids,
                                             const std::optional<at::Tensor>& segment_ids) {
  TORCH_CHECK(input_ids.dim() == 2 && labels.sizes() == input_ids.sizes() &&
                  labels.scalar_type() == at::kLong,
              "Llama summed_loss: labels must be int64 ", input_ids.sizes(),
              " like input_ids, got ", labels.scalar_type(), " ", labels.sizes());
  const int64_t B = input_ids.size(0), T = input_ids.size(1);
  const auto dev = input_ids.device();
  // Position t predicts labels[t + 1], as transformers' ForCausalLMLoss.
  at::Tensor targets = at::full({B, T}, -100, labels.options().device(dev));
  if (T > 1) targets.narrow(1, 0, T - 1).copy_(labels.narrow(1, 1, T - 1));
  at::Tensor hidden;
  const bool padded = attention_mask.has_value() && !segment_ids.has_value() &&
                      !attention_mask->to(at::kBool).all().item<bool>();
  if (padded) {
    // Padding-free: only the real tokens go through the layers
    // (forward_unpadded), at the positions they have in the padded batch.
    // Pad positions predict nothing (their attention_mask is 0).
    const at::Tensor mask = attention_mask->to(dev);
    const at::Tensor keep = mask.to(at::kBool).reshape({-1}).nonzero().squeeze(1);
    const at::Tensor positions = position_ids
                                     ? position_ids->to(dev, at::kLong).expand({B, T}).contiguous()
                                     : at::arange(T, input_ids.options().dtype(at::kLong))
                                           .unsqueeze(0)
                                           .expand({B, T})
                                           .contiguous();
    hidden = model->forward_unpadded(input_ids, keep, mask, positions);
    targets = targets.reshape({-1}).index_select(0, keep);
  } else {
    hidden = model->forward(input_ids, attention_mask, position_ids, nullptr, segment_ids);
  }
  const int64_t H = hidden.size(-1);
  const at::Tensor flat_targets = targets.reshape({-1});
  const at::Tensor labelled = flat_targets.ne(-100).nonzero().squeeze(1);
  const at::Tensor h = hidden.reshape({-1, H}).index_select(0, labelled);
  const at::Tensor y = flat_targets.index_select(0, labelled);
  const torch::nn::LinearImpl* head = lm_head.plain_linear();
  if (head && !head->bias.defined() && !head->weight.requires_grad())
    return nn::linear_cross_entropy_sum(h, head->weight, y);
  return at::cross_entropy_loss(lm_head(h).to(at::kFloat), y, {}, at::Reduction::Sum);
}

at::Tensor LlamaForCausalLMImpl::generate(const at::Tensor& input_ids, const GenerationConfig& g,
                                          const std::optional<at::Tensor>& attention_mask) {
  check_generation(g);
  TORCH_CHECK(input_ids.dim() == 2 && input_ids.size(1) > 0,
              "generate: input_ids must be [batch, seq] with seq > 0, got ", input_ids.sizes());
  at::NoGradGuard no_grad;
  const std::vector<int64_t> stop = g.stop_token_ids.value_or(config_.eos_token_ids);
  const int64_t pad = config_.pad_token_id.value_or(stop.empty() ? 0 : stop[0]);
  const auto long_opts = input_ids.options().dtype(at::kLong);
  const at::Tensor stop_ids = at::tensor(stop, at::kLong).to(input_ids.device());
  const int64_t B = input_ids.size(0), T = input_ids.size(1);

  std::optional<at::Tensor> mask;
  at::Tensor positions;
  if (attention_mask) {  // left padding: positions count real tokens (HF generate)
    mask = attention_mask->to(input_ids.device(), at::kLong);
    positions = (mask->cumsum(-1) - 1).clamp_min(0);
  } else {
    positions = at::arange(T, long_opts).unsqueeze(0).expand({B, T});
  }
  at::Generator gen = at::detail::createCPUGenerator(g.seed);
  KVCache cache;
  at::Tensor hidden = model->forward(input_ids, mask, positions, &cache);
  at::Tensor last_pos = positions.select(1, T - 1);
  std::vector<at::Tensor> pieces{input_ids};
  at::Tensor finished = at::zeros({B}, long_opts.dtype(at::kBool));
  for (int64_t step = 0; step < g.max_new_tokens; ++step) {
    const at::Tensor logits = lm_head(hidden.select(1, hidden.size(1) - 1)).to(at::kFloat);
    at::Tensor next =
        g.temperature == 0 ? logits.argmax(-1) : sample(logits, g, gen).to(input_ids.device());
    next = at::where(finished, at::full({B}, pad, long_opts), next);
    pieces.push_back(next.unsqueeze(1));
    if (!stop.empty()) finished = finished.logical_or(at::isin(next, stop_ids));
    if (step + 1 == g.max_new_tokens || finished.all().item<bool>()) break;
    if (mask) mask = at::cat({*mask, at::ones({B, 1}, long_opts)}, 1);
    last_pos = last_pos + 1;
    hidden = model->forward(next.unsqueeze(1), mask, last_pos.unsqueeze(1), &cache);
  }
  return at::cat(pieces, 1);
}

}  // namespace qlora::models
