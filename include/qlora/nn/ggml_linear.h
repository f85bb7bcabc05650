// LoRA over a frozen base kept in a GGUF tensor's own ggml blocks (Q4_0,
// Q4_K, Q6_K, ...: qlora::ggml_matmul), never re-quantised to NF4: a model
// read from a llama.cpp file trains against exactly the weights llama.cpp
// runs.
#pragma once

#include <torch/nn/pimpl.h>

#include <string>
#include <vector>

#include "qlora/nn/lora_layer.h"

namespace qlora::nn {

class GgmlLoRALinearImpl : public LoRALayerImpl {
 public:
  // `blocks`: the stored bytes as a uint8 [out, in / block_size *
  // type_size] tensor; `ggml_type`: ggml's name of their type ("Q4_K");
  // the matmul runs in `compute_dtype`.
  GgmlLoRALinearImpl(const at::Tensor& blocks, const std::string& ggml_type, int64_t out_features,
                     int64_t in_features, const std::optional<at::Tensor>& bias,
                     const LoRAConfig& lora, at::ScalarType compute_dtype);

  at::Tensor base_forward(const at::Tensor& x) override;
  at::Tensor base_weight(at::ScalarType dtype) const override;
  std::optional<at::Tensor> base_bias() const override;
  void pretty_print(std::ostream& stream) const override;

  const at::Tensor& blocks() const { return blocks_; }
  const std::string& ggml_type() const { return ggml_type_; }
  at::ScalarType compute_dtype() const { return compute_dtype_; }

 private:
  at::Tensor blocks_;  // frozen buffer "weight"
  std::string ggml_type_;
  std::vector<int64_t> shape_;  // [out, in]
  at::ScalarType compute_dtype_;
};
TORCH_MODULE(GgmlLoRALinear);

}  // namespace qlora::nn
