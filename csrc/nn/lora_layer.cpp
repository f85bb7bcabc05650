#include "qlora/nn/lora_layer.h"

#include "qlora/nn/hash_dropout.h"
#include "qlora/nn/recompute_tape.h"

#include <ATen/ops/addmm.h>
#include <ATen/ops/linalg_vector_norm.h>
#include <ATen/ops/linear.h>
#include <torch/nn/init.h>

#include <cmath>

namespace qlora::nn {

LoRALayerImpl::LoRALayerImpl(int64_t in_features, int64_t out_features, const LoRAConfig& config)
    : in_features_(in_features), out_features_(out_features), config_(config) {
  config_.validate();
}

at::Tensor LoRALayerImpl::frozen_base_matmul(const at::Tensor& x, at::ScalarType compute_dtype,
                                             const BaseMatmul& matmul, const BaseReplay& replay) {
  const std::optional<at::Tensor> b = base_bias();
  const at::Tensor xc = x.to(compute_dtype);
  const std::optional<at::Tensor> bc =
      b ? std::optional<at::Tensor>(b->to(compute_dtype)) : std::nullopt;
  at::Tensor y;
  if (RecomputeTape* tape = replaying_tape()) {
    std::vector<int64_t> sizes(xc.sizes().begin(), xc.sizes().end() - 1);
    sizes.push_back(out_features());
    y = replay(xc, bc, tape->replay(sizes));
  } else {
    y = matmul(xc, bc);
    if (RecomputeTape* tape = recording_tape()) tape->record(y);
  }
  return y.to(x.scalar_type());
}

void LoRALayerImpl::init_adapter(c10::Device device) {
  const auto opts = at::TensorOptions().dtype(at::kFloat).device(device);
  // PEFT: A like nn.Linear's default (Kaiming-uniform, a = sqrt(5)), B zeros.
  // Drawn from the CPU generator on every device, so a run starts from the
  // same adapter on the GPU as on the CPU.
  at::Tensor a = at::empty({config_.r, in_features_}, at::TensorOptions().dtype(at::kFloat));
  {
    at::NoGradGuard no_grad;
    torch::nn::init::kaiming_uniform_(a, std::sqrt(5.0));
  }
  if (!device.is_cpu()) a = a.to(device);
  lora_A = register_parameter("lora_A", a);
  lora_B = register_parameter("lora_B", at::zeros({out_features_, config_.r}, opts));
  if (config_.use_dora) {
    at::NoGradGuard no_grad;
    // With B = 0 the DoRA magnitude starts at the row norms of the base.
    const at::Tensor norm = at::linalg_vector_norm(base_weight(at::kFloat), 2, {1}, false);
    lora_magnitude_vector = register_parameter("lora_magnitude_vector", norm.clone());
  }
  if (config_.dropout > 0)
    dropout_ = register_module("lora_dropout", torch::nn::Dropout(config_.dropout));
}

void LoRALayerImpl::register_base_bias(const std::optional<at::Tensor>& bias) {
  if (!bias.has_value() || !bias->defined()) return;
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_features_,
              "LoRA layer: bias must have shape [", out_features_, "], got ", bias->sizes());
  if (config_.bias == "none") {
    bias_ = register_buffer("bias", bias->detach().clone());
  } else {
    bias_ = register_parameter("bias", bias->detach().clone());
  }
}

at::Tensor LoRALayerImpl::forward(const at::Tensor& x) {
  const at::Tensor result = base_forward(x);
  const bool dropout_active = dropout_ && is_training();
  at::Tensor x_lora = x.to(at::kFloat);
  // The seed-based dropout: parallel, and its backward regenerates the
  // mask instead of keeping one per layer (torch's CPU bernoulli is serial).
  if (dropout_active) x_lora = hash_dropout(x_lora, config_.dropout);
  if (config_.use_dora)
    return result + dora_delta(x_lora, result, dropout_active).to(result.scalar_type());
  // The scaling goes on the rank-r product; a float32 base output then
  // takes (s x A^T) B^T as one GEMM accumulating into it, so no [.., out]
  // delta is written, read back and added.
  const at::Tensor u = at::linear(x_lora, lora_A).mul_(scaling());
  if (result.scalar_type() != at::kFloat)
    return result + at::linear(u, lora_B).to(result.scalar_type());
  return at::addmm(result.reshape({-1, out_features_}), u.reshape({-1, config_.r}), lora_B.t())
      .view(result.sizes());
}

at::Tensor LoRALayerImpl::dora_weight_norm(const at::Tensor& weight) const {
  const at::Tensor lora_weight = lora_B.detach().matmul(lora_A.detach());
  return at::linalg_vector_norm(weight + scaling() * lora_weight, 2, {1}, false).detach();
}

// PEFT's DoraLinearLayer: (m / ||W + sBA|| - 1) * (x W^T) + m / ||W + sBA|| * s * B A x,
// added to the base output; the norm is a constant for the gradient (DoRA 4.3).
at::Tensor LoRALayerImpl::dora_delta(const at::Tensor& x_lora, const at::Tensor& result,
                                     bool dropout_active) {
  const at::Tensor weight = base_weight(at::kFloat);
  const at::Tensor mag_norm_scale =
      (lora_magnitude_vector / dora_weight_norm(weight)).view({1, -1});
  const at::Tensor lora_result = at::linear(at::linear(x_lora, lora_A), lora_B);
  at::Tensor base_result;
  if (dropout_active) {
    base_result = at::linear(x_lora, weight);  // the base on the dropped-out input, no bias
  } else {
    base_result = result.to(at::kFloat);
    if (const auto b = base_bias()) base_result = base_result - b->to(at::kFloat);
  }
  return (mag_norm_scale - 1) * base_result + mag_norm_scale * lora_result * scaling();
}

at::Tensor LoRALayerImpl::merged_weight(at::ScalarType dtype) const {
  at::NoGradGuard no_grad;
  const at::Tensor weight = base_weight(at::kFloat);
  at::Tensor merged = weight + scaling() * lora_B.matmul(lora_A);
  if (config_.use_dora) {
    const at::Tensor norm = at::linalg_vector_norm(merged, 2, {1}, false);
    merged = merged * (lora_magnitude_vector / norm).view({-1, 1});
  }
  return merged.to(dtype);
}

torch::nn::Linear LoRALayerImpl::merge_and_unload() const {
  const auto b = base_bias();
  torch::nn::Linear linear(
      torch::nn::LinearOptions(in_features_, out_features_).bias(b.has_value()));
  at::NoGradGuard no_grad;
  const at::Tensor w = merged_weight(at::kFloat);
  linear->weight.set_data(w.to(w.device()));
  if (b) linear->bias.set_data(b->detach().to(at::kFloat).clone());
  return linear;
}

int64_t LoRALayerImpl::num_trainable_parameters() const {
  int64_t n = 0;
  for (const auto& p : parameters())
    if (p.requires_grad()) n += p.numel();
  return n;
}

int64_t LoRALayerImpl::memory_bytes() const {
  int64_t n = 0;
  for (const auto& p : parameters()) n += p.numel() * p.element_size();
  for (const auto& b : buffers()) n += b.numel() * b.element_size();
  return n;
}

void LoRALayerImpl::pretty_print_adapter(std::ostream& stream) const {
  stream << "r=" << config_.r << ", alpha=" << config_.alpha << ", scaling=" << scaling();
  if (config_.dropout > 0) stream << ", dropout=" << config_.dropout;
  if (config_.use_rslora) stream << ", rslora";
  if (config_.use_dora) stream << ", dora";
  stream << ", trainable=" << num_trainable_parameters();
}

}  // namespace qlora::nn
