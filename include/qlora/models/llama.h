// The LLaMA-family causal LM (LLaMA 1/2/3, SmolLM, Mistral-style GQA,
// Qwen2), laid out exactly as transformers' LlamaForCausalLM so that
// dotted module names (model.layers.N.self_attn.q_proj, ...) and so
// checkpoint and PEFT adapter keys are the same.
//
// Every Linear sits in a qlora::nn::LinearHost slot, so qlora::nn::apply_lora
// can replace any of them by a LoRALinear / QLoRALinear in place.
#pragma once

#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "qlora/models/llama_config.h"
#include "qlora/nn/linear_host.h"

namespace qlora::models {

// Supplies the weights while a model is built, so that a loader can stream a
// checkpoint layer by layer (quantising as it goes) instead of first
// allocating a randomly initialised model and overwriting it.
class LlamaWeightSource {
 public:
  virtual ~LlamaWeightSource() = default;
  // The Linear-like module (torch::nn::Linear, LoRALinear or QLoRALinear) at
  // dotted `name` (e.g. "model.layers.0.mlp.up_proj"), weight [out, in].
  virtual std::shared_ptr<torch::nn::Module> linear(const std::string& name, int64_t in_features,
                                                    int64_t out_features, bool bias) = 0;
  // The tensor at dotted `name` (embedding and RMSNorm weights) of `shape`.
  virtual at::Tensor tensor(const std::string& name, at::IntArrayRef shape) = 0;
};

// transformers' _init_weights: weights ~ N(0, initializer_range), zero
// biases, the padding embedding row zero, RMSNorm weights one; drawn from
// the global generator (torch::manual_seed) in construction order.
class RandomLlamaWeights : public LlamaWeightSource {
 public:
  explicit RandomLlamaWeights(const LlamaConfig& config,
                              at::TensorOptions options = at::TensorOptions(at::kFloat));
  std::shared_ptr<torch::nn::Module> linear(const std::string& name, int64_t in_features,
                                            int64_t out_features, bool bias) override;
  at::Tensor tensor(const std::string& name, at::IntArrayRef shape) override;

 private:
  LlamaConfig config_;
  at::TensorOptions options_;
};

// A torch::nn::Linear whose parameters are `weight` [out, in] and `bias`
// themselves (no fresh weight is allocated and initialised first). Passing
// another module's parameter ties the two: one tensor, one gradient.
torch::nn::Linear make_linear(const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias = std::nullopt);

// Keys and values of past positions, per layer, after RoPE; for incremental
// decoding (generate). Inference only: when grad mode is on, appends
// concatenate instead of writing into the preallocated buffers.
struct KVCache {
  std::vector<at::Tensor> keys, values;  // per layer [B, kv_heads, capacity, head_dim]
  at::Tensor key_mask;                   // bool [B, length], true = real token; undefined = all
  int64_t length = 0;                    // positions cached

  // Writes [B, kv_heads, T, head_dim] after the cached positions of
  // `layer` and returns that layer's keys and values for all length + T
  // positions. `length` itself advances once per forward (the model does it).
  std::pair<at::Tensor, at::Tensor> append(int64_t layer, const at::Tensor& k, const at::Tensor& v);
  void clear();
};

// What every decoder layer of one forward pass shares.
struct LayerInputs {
  at::Tensor cos, sin;             // [B, T, head_dim] in the hidden dtype
  std::optional<at::Tensor> mask;  // bool [B or 1, 1, T, S]: true where query may attend key
  bool causal = false;             // no mask: SDPA applies the plain causal mask itself
  KVCache* cache = nullptr;
  // Padding-free runs (LlamaModelImpl::forward_unpadded): the hidden states
  // hold only the real tokens, [1, n, H], and cos/sin are theirs; attention
  // scatters q, k, v to the padded [padded_batch, padded_len] layout at these
  // flat indices, attends there under `mask`, and gathers its output back.
  at::Tensor token_index;  // int64 [n] into [padded_batch * padded_len]; undefined: padded run
  int64_t padded_batch = 0, padded_len = 0;
};

// HF LlamaRMSNorm: normalised in float32, cast back, then scaled.
class LlamaRMSNormImpl : public torch::nn::Module {
 public:
  LlamaRMSNormImpl(const at::Tensor& weight, double eps);
  at::Tensor forward(const at::Tensor& x);
  void pretty_print(std::ostream& stream) const override;
  at::Tensor weight;

 private:
  double eps_;
};
TORCH_MODULE(LlamaRMSNorm);

class LlamaAttentionImpl : public nn::LinearHost {
 public:
  LlamaAttentionImpl(const LlamaConfig& config, int64_t layer_idx, LlamaWeightSource& weights,
                     const std::string& prefix);
  at::Tensor forward(const at::Tensor& x, const LayerInputs& in);
  nn::LinearRef q_proj, k_proj, v_proj, o_proj;

 private:
  int64_t layer_idx_, num_heads_, num_kv_heads_, head_dim_;
  double dropout_;
};
TORCH_MODULE(LlamaAttention);

class LlamaMLPImpl : public nn::LinearHost {
 public:
  LlamaMLPImpl(const LlamaConfig& config, LlamaWeightSource& weights, const std::string& prefix);
  at::Tensor forward(const at::Tensor& x);  // down(silu(gate(x)) * up(x))
  nn::LinearRef gate_proj, up_proj, down_proj;
};
TORCH_MODULE(LlamaMLP);

class LlamaDecoderLayerImpl : public torch::nn::Module {
 public:
  LlamaDecoderLayerImpl(const LlamaConfig& config, int64_t layer_idx, LlamaWeightSource& weights,
                        const std::string& prefix);
  at::Tensor forward(const at::Tensor& x, const LayerInputs& in);
  LlamaAttention self_attn{nullptr};
  LlamaMLP mlp{nullptr};
  LlamaRMSNorm input_layernorm{nullptr}, post_attention_layernorm{nullptr};
};
TORCH_MODULE(LlamaDecoderLayer);

// transformers' LlamaModel: embeddings, decoder layers, final norm.
class LlamaModelImpl : public torch::nn::Module {
 public:
  LlamaModelImpl(const LlamaConfig& config, LlamaWeightSource& weights);
  // The final hidden states [B, T, hidden_size] (after `norm`); arguments
  // as LlamaForCausalLMImpl::forward.
  at::Tensor forward(const at::Tensor& input_ids,
                     const std::optional<at::Tensor>& attention_mask = std::nullopt,
                     const std::optional<at::Tensor>& position_ids = std::nullopt,
                     KVCache* cache = nullptr,
                     const std::optional<at::Tensor>& segment_ids = std::nullopt);
  // The final hidden states [1, n, hidden_size] of the n real tokens of a
  // padded batch, in row-major order: token_index (int64 [n]) holds their
  // flat indices into [B, T], attention_mask [B, T] is nonzero exactly
  // there, positions [B, T]. Equal, token for token, to forward() with that
  // attention_mask and position_ids, but no layer computes on padding:
  // only attention works in the padded layout.
  at::Tensor forward_unpadded(const at::Tensor& input_ids, const at::Tensor& token_index,
                              const at::Tensor& attention_mask, const at::Tensor& positions);
  // Checkpointed layers keep only their input and are run again in
  // backward. With keep_frozen_matmuls (selective recomputation,
  // nn/recompute_tape.h) they also keep the outputs of their frozen 4-bit
  // matmuls and replay them: about 1/3 fewer FLOPs per step, for
  // (2 * hidden + q/k/v + 2 * intermediate) values per token and layer
  // held until backward reaches the layer. Gradients are identical.
  void set_gradient_checkpointing(bool enabled, bool keep_frozen_matmuls = false) {
    gradient_checkpointing_ = enabled;
    keep_frozen_matmuls_ = keep_frozen_matmuls;
  }
  bool gradient_checkpointing() const { return gradient_checkpointing_; }
  bool keeps_frozen_matmuls() const { return keep_frozen_matmuls_; }

  torch::nn::Embedding embed_tokens{nullptr};
  torch::nn::ModuleList layers{nullptr};
  LlamaRMSNorm norm{nullptr};

 private:
  LayerInputs layer_inputs(const at::Tensor& positions, const at::Tensor& key_mask,
                           const std::optional<at::Tensor>& segment_ids, int64_t past,
                           int64_t length, at::ScalarType dtype, KVCache* cache);
  at::Tensor run_layer(size_t i, const at::Tensor& hidden, const LayerInputs& in);

  LlamaConfig config_;
  std::vector<LlamaDecoderLayer> layer_list_;
  at::Tensor inv_freq_;  // not a buffer: derived from the config, never saved (as in HF)
  bool gradient_checkpointing_ = false;
  bool keep_frozen_matmuls_ = false;
};
TORCH_MODULE(LlamaModel);

struct GenerationConfig {
  int64_t max_new_tokens = 32;
  double temperature = 0.0;  // 0: greedy (argmax); else sample from softmax(logits / T)
  int64_t top_k = 0;         // sampling: keep the k most likely tokens (0: all)
  double top_p = 1.0;        // sampling: nucleus, as transformers' TopPLogitsWarper
  // A sequence ends after emitting one of these; nullopt: the config's
  // eos_token_ids; empty: never stop early.
  std::optional<std::vector<int64_t>> stop_token_ids;
  uint64_t seed = 0;  // sampling generator seed
};

class LlamaForCausalLMImpl : public nn::LinearHost {
 public:
  // Randomly initialised (RandomLlamaWeights, float32, CPU).
  explicit LlamaForCausalLMImpl(const LlamaConfig& config);
  LlamaForCausalLMImpl(const LlamaConfig& config, LlamaWeightSource& weights);

  // Logits [B, T, vocab] in float32.
  //   input_ids       int64 [B, T]
  //   attention_mask  [B, T] (or [B, past + T] with a cache) of 0/1, as
  //                   transformers takes it: keys at 0 are never attended.
  //   position_ids    int64 [B, T]; default past .. past + T - 1, or, with
  //                   segment_ids, positions restarting at 0 in each segment.
  //   cache           past keys/values, extended in place.
  //   segment_ids     int64 [B, T] for packed sequences: a token attends only
  //                   to earlier tokens of the same segment id (no cache).
  at::Tensor forward(const at::Tensor& input_ids,
                     const std::optional<at::Tensor>& attention_mask = std::nullopt,
                     const std::optional<at::Tensor>& position_ids = std::nullopt,
                     KVCache* cache = nullptr,
                     const std::optional<at::Tensor>& segment_ids = std::nullopt);

  // Summed next-token cross-entropy (float32 scalar) over the positions
  // whose label is not -100, labels [B, T] aligned with input_ids and
  // shifted inside as transformers' ForCausalLMLoss does (position t
  // predicts labels[t + 1]). Only labelled positions go through lm_head, and
  // a frozen dense lm_head is fused with the loss
  // (nn::linear_cross_entropy_sum): [B, T, vocab] logits never exist.
  // A padded batch (attention_mask with zeros, no segment_ids) runs
  // padding-free: its real tokens go through the layers as one packed
  // sequence, so no layer computes on padding; positions whose mask is 0
  // predict nothing. Other arguments as forward.
  at::Tensor summed_loss(const at::Tensor& input_ids, const at::Tensor& labels,
                         const std::optional<at::Tensor>& attention_mask = std::nullopt,
                         const std::optional<at::Tensor>& position_ids = std::nullopt,
                         const std::optional<at::Tensor>& segment_ids = std::nullopt);

  // [B, T + n] sequences: the prompts and up to max_new_tokens new tokens;
  // rows that stopped early are filled with pad_token_id (else the first
  // stop token). A left-padded batch takes its attention_mask; position ids
  // then count real tokens only, as transformers' generate does.
  at::Tensor generate(const at::Tensor& input_ids, const GenerationConfig& generation,
                      const std::optional<at::Tensor>& attention_mask = std::nullopt);

  // Recompute each decoder layer in backward instead of keeping its
  // activations (used when grad mode is on and no cache is passed). The
  // gradients are identical: dropout masks are replayed from the RNG state.
  void set_gradient_checkpointing(bool enabled, bool keep_frozen_matmuls = false) {
    model->set_gradient_checkpointing(enabled, keep_frozen_matmuls);
  }

  const LlamaConfig& config() const { return config_; }

  LlamaModel model{nullptr};
  nn::LinearRef lm_head;

 private:
  void build(LlamaWeightSource& weights);

  LlamaConfig config_;
};
TORCH_MODULE(LlamaForCausalLM);

}  // namespace qlora::models
