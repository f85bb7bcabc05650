// The trainable low-rank update shared by LoRALinear (dense frozen base) and
// QLoRALinear (4-bit frozen base): QLoRA is LoRA over a quantised base, one
// code path for both.
#pragma once

#include <torch/nn/module.h>
#include <torch/nn/modules/dropout.h>
#include <torch/nn/modules/linear.h>

#include <functional>
#include <optional>
#include <ostream>

#include "qlora/nn/lora_config.h"

namespace qlora::nn {

class LoRALayerImpl : public torch::nn::Module {
 public:
  // y = base(x) + scaling * B(A(dropout(x))), or PEFT's DoRA when
  // config.use_dora. The LoRA path runs in float32 (the adapter's dtype) and
  // is added back in the base output's dtype.
  at::Tensor forward(const at::Tensor& x);

  // Frozen base: its output (bias included), its dense weight and bias.
  virtual at::Tensor base_forward(const at::Tensor& x) = 0;
  virtual at::Tensor base_weight(at::ScalarType dtype) const = 0;
  virtual std::optional<at::Tensor> base_bias() const = 0;

  // The weight a plain Linear needs to reproduce forward() in eval mode:
  // base + scaling * B A (or the DoRA-rescaled rows), computed against the
  // weight the adapter was trained with (for QLoRA: dequant(W)).
  at::Tensor merged_weight(at::ScalarType dtype = at::kFloat) const;
  torch::nn::Linear merge_and_unload() const;

  int64_t in_features() const { return in_features_; }
  int64_t out_features() const { return out_features_; }
  const LoRAConfig& lora_config() const { return config_; }
  double scaling() const { return config_.scaling(); }
  int64_t num_trainable_parameters() const;
  // Bytes of every parameter and buffer (the frozen base as stored).
  int64_t memory_bytes() const;

  at::Tensor lora_A;                 // [r, in], Kaiming-uniform as PEFT
  at::Tensor lora_B;                 // [out, r], zeros: a fresh adapter is a no-op
  at::Tensor lora_magnitude_vector;  // [out], DoRA only

 protected:
  LoRALayerImpl(int64_t in_features, int64_t out_features, const LoRAConfig& config);
  // The frozen base's output for a quantised base: x and the bias cast to
  // `compute_dtype`, then `matmul(x, bias)`, recorded when a selective-
  // recomputation tape records; while one replays, `replay(x, bias, output)`
  // with the recorded output instead. The result is cast back to x's dtype.
  using BaseMatmul = std::function<at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&)>;
  using BaseReplay = std::function<at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&,
                                              const at::Tensor&)>;
  at::Tensor frozen_base_matmul(const at::Tensor& x, at::ScalarType compute_dtype,
                                const BaseMatmul& matmul, const BaseReplay& replay);
  // Call once the base is in place (DoRA's magnitude starts at ||W|| rows).
  void init_adapter(c10::Device device);
  void pretty_print_adapter(std::ostream& stream) const;
  // Registers the base bias: frozen buffer, or parameter when config.bias trains it.
  void register_base_bias(const std::optional<at::Tensor>& bias);
  at::Tensor bias_;

 private:
  at::Tensor dora_delta(const at::Tensor& x_lora, const at::Tensor& result, bool dropout_active);
  // Row norms of base + scaling * B A, detached as in PEFT's DoRA.
  at::Tensor dora_weight_norm(const at::Tensor& weight) const;

  int64_t in_features_, out_features_;
  LoRAConfig config_;
  torch::nn::Dropout dropout_{nullptr};
};

}  // namespace qlora::nn
