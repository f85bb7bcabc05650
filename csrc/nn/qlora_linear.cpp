#include "qlora/nn/qlora_linear.h"

#include <ATen/ops/scalar_tensor.h>

#include "qlora/ops.h"

#include "autograd/matmul_4bit_autograd.h"

namespace qlora::nn {

QLoRALinearImpl::QLoRALinearImpl(const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                 const LoRAConfig& lora, const QuantizedBaseConfig& base)
    : LoRALayerImpl(weight.size(-1), weight.size(0), lora), compute_dtype_(base.compute_dtype) {
  TORCH_CHECK(weight.dim() == 2, "QLoRALinear: weight must be [out, in], got ", weight.sizes());
  at::NoGradGuard no_grad;
  auto [packed, state] = quantize_4bit(weight.detach(), base.quant);
  register_base(packed, state);
  register_base_bias(bias);
  init_adapter(weight.device());
}

QLoRALinearImpl::QLoRALinearImpl(const at::Tensor& packed, const QuantState& state,
                                 const std::optional<at::Tensor>& bias, const LoRAConfig& lora,
                                 at::ScalarType compute_dtype)
    : LoRALayerImpl(state.shape.at(1), state.shape.at(0), lora), compute_dtype_(compute_dtype) {
  TORCH_CHECK(state.shape.size() == 2, "QLoRALinear: the quantised weight must be 2-D, got shape ",
              at::IntArrayRef(state.shape));
  register_base(packed, state);
  register_base_bias(bias);
  init_adapter(packed.device());
}

// Every tensor of the quantised state is a buffer: it moves with .to(device),
// is saved with the module, and is never seen by an optimizer.
void QLoRALinearImpl::register_base(const at::Tensor& packed, const QuantState& state) {
  state_ = state;
  packed_ = register_buffer("weight", packed);
  state_.absmax = register_buffer("weight_absmax", state.absmax);
  state_.code = register_buffer("weight_quant_map", state.code);
  if (state_.nested) {
    state_.nested->absmax = register_buffer("weight_nested_absmax", state.nested->absmax);
    state_.nested->code = register_buffer("weight_nested_quant_map", state.nested->code);
  }
}

at::Tensor QLoRALinearImpl::base_forward(const at::Tensor& x) {
  return frozen_base_matmul(
      x, compute_dtype_,
      [&](const at::Tensor& xc, const std::optional<at::Tensor>& bc) {
        // Double-quantised statistics go to gemm_4bit as they are stored.
        if (state_.nested && state_.nested->blocksize == 256 && xc.scalar_type() != at::kDouble) {
          if (!nested_offset_.defined() || nested_offset_.device() != packed_.device())
            nested_offset_ =
                at::scalar_tensor(state_.nested->offset, packed_.options().dtype(at::kFloat));
          return gemm_4bit(xc, packed_, state_.shape,
                           NestedAbsmax{state_.absmax, state_.nested->absmax, state_.nested->code,
                                        nested_offset_},
                           state_.blocksize, state_.quant_type, bc);
        }
        return matmul_4bit(xc, packed_, state_.float_absmax(), state_.blocksize, state_.quant_type,
                           state_.shape, bc);
      },
      [&](const at::Tensor& xc, const std::optional<at::Tensor>& bc, const at::Tensor& recorded) {
        return detail::matmul_4bit_replay(xc, packed_, state_.float_absmax(), state_.blocksize,
                                          state_.quant_type, state_.shape, bc, recorded);
      });
}

at::Tensor QLoRALinearImpl::base_weight(at::ScalarType dtype) const {
  return dequantize_4bit(packed_, state_).to(dtype);
}

std::optional<at::Tensor> QLoRALinearImpl::base_bias() const {
  return bias_.defined() ? std::optional<at::Tensor>(bias_) : std::nullopt;
}

std::map<std::string, at::Tensor> QLoRALinearImpl::base_state_dict(
    const std::string& prefix) const {
  return state_.to_state_dict(prefix, packed_);
}

QLoRALinearImpl::Requantized QLoRALinearImpl::requantize_merged(const QuantConfig& config) const {
  at::NoGradGuard no_grad;
  QuantState target = state_;
  const at::Tensor merged = merged_weight(at::kFloat);
  auto [packed, state] = quantize_4bit(merged.to(state_.dtype), config);
  const at::Tensor err = dequantize_4bit(packed, state).to(at::kFloat) - merged;
  const double rms = err.pow(2).mean().sqrt().item<double>();
  const double ref = merged.pow(2).mean().sqrt().item<double>();
  return {packed, state, err.abs().max().item<double>(), rms, ref > 0 ? rms / ref : 0.0};
}

void QLoRALinearImpl::pretty_print(std::ostream& stream) const {
  stream << "qlora::nn::QLoRALinear(in=" << in_features() << ", out=" << out_features() << ", "
         << state_.quant_type << " blocksize=" << state_.blocksize
         << (state_.nested ? " double-quant" : "") << ", compute " << compute_dtype_ << ", ";
  pretty_print_adapter(stream);
  stream << ", " << memory_bytes() << " bytes)";
}

}  // namespace qlora::nn
