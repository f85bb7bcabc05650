#include "qlora/nn/ggml_linear.h"

#include <algorithm>

#include "qlora/ops.h"

#include "autograd/ggml_matmul_autograd.h"

namespace qlora::nn {

GgmlLoRALinearImpl::GgmlLoRALinearImpl(const at::Tensor& blocks, const std::string& ggml_type,
                                       int64_t out_features, int64_t in_features,
                                       const std::optional<at::Tensor>& bias,
                                       const LoRAConfig& lora, at::ScalarType compute_dtype)
    : LoRALayerImpl(in_features, out_features, lora),
      ggml_type_(ggml_type),
      shape_{out_features, in_features},
      compute_dtype_(compute_dtype) {
  TORCH_CHECK(blocks.dim() == 2 && blocks.size(0) == out_features, "GgmlLoRALinear: ", ggml_type,
              " blocks must be [", out_features, ", row bytes], got ", blocks.sizes());
  // The op's own checks name what is wrong with the type, the row length
  // or the bytes of a row (one row decoded).
  {
    at::NoGradGuard no_grad;
    const int64_t rows = std::min<int64_t>(1, out_features);
    (void)ggml_dequantize(blocks.narrow(0, 0, rows), ggml_type, {rows, in_features}, at::kFloat);
  }
  blocks_ = register_buffer("weight", blocks);
  register_base_bias(bias);
  init_adapter(blocks.device());
}

at::Tensor GgmlLoRALinearImpl::base_forward(const at::Tensor& x) {
  return frozen_base_matmul(
      x, compute_dtype_,
      [&](const at::Tensor& xc, const std::optional<at::Tensor>& bc) {
        return ggml_matmul(xc, blocks_, ggml_type_, shape_, bc);
      },
      [&](const at::Tensor& xc, const std::optional<at::Tensor>& bc, const at::Tensor& recorded) {
        return detail::ggml_matmul_replay(xc, blocks_, ggml_type_, shape_, bc, recorded);
      });
}

at::Tensor GgmlLoRALinearImpl::base_weight(at::ScalarType dtype) const {
  return ggml_dequantize(blocks_, ggml_type_, shape_, at::kFloat).to(dtype);
}

std::optional<at::Tensor> GgmlLoRALinearImpl::base_bias() const {
  return bias_.defined() ? std::optional<at::Tensor>(bias_) : std::nullopt;
}

void GgmlLoRALinearImpl::pretty_print(std::ostream& stream) const {
  stream << "qlora::nn::GgmlLoRALinear(in=" << in_features() << ", out=" << out_features() << ", "
         << ggml_type_ << " (GGUF blocks), compute " << compute_dtype_ << ", ";
  pretty_print_adapter(stream);
  stream << ", " << memory_bytes() << " bytes)";
}

}  // namespace qlora::nn
