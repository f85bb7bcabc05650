// QLoRA: a frozen 4-bit (NF4/FP4, bitsandbytes layout) base weight held in
// buffers, plus a trainable LoRA/DoRA adapter.
#pragma once

#include <torch/nn/pimpl.h>

#include <map>
#include <string>

#include "qlora/nn/lora_layer.h"
#include "qlora/quant_state.h"

namespace qlora::nn {

class QLoRALinearImpl : public LoRALayerImpl {
 public:
  // Quantises a dense [out, in] weight on construction.
  QLoRALinearImpl(const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const LoRAConfig& lora, const QuantizedBaseConfig& base);
  // From an already quantised weight (e.g. a bitsandbytes checkpoint), never
  // re-quantising it.
  QLoRALinearImpl(const at::Tensor& packed, const QuantState& state,
                  const std::optional<at::Tensor>& bias, const LoRAConfig& lora,
                  at::ScalarType compute_dtype);

  at::Tensor base_forward(const at::Tensor& x) override;
  at::Tensor base_weight(at::ScalarType dtype) const override;
  std::optional<at::Tensor> base_bias() const override;
  void pretty_print(std::ostream& stream) const override;

  const at::Tensor& packed_weight() const { return packed_; }
  const QuantState& quant_state() const { return state_; }
  at::ScalarType compute_dtype() const { return compute_dtype_; }
  // bitsandbytes / Hugging Face keys of the base weight under `prefix`.
  std::map<std::string, at::Tensor> base_state_dict(const std::string& prefix) const;

  // Quantises merged_weight() again (the adapter folded into a new 4-bit
  // base) and reports what that costs against the exact merged weight.
  struct Requantized {
    at::Tensor packed;
    QuantState state;
    double max_abs_error;
    double rms_error;
    double relative_rms_error;  // rms error / rms of the merged weight
  };
  Requantized requantize_merged(const QuantConfig& config) const;

 private:
  void register_base(const at::Tensor& packed, const QuantState& state);

  at::Tensor packed_;
  QuantState state_;
  at::Tensor nested_offset_;  // state_.nested->offset as gemm_4bit takes it, on the weight's device
  at::ScalarType compute_dtype_;
};
TORCH_MODULE(QLoRALinear);

}  // namespace qlora::nn
