// Quantizes, dequantizes and multiplies through the installed qlora package.
#include <qlora/ops.h>
#include <qlora/quant_state.h>
#include <torch/torch.h>

#include <iostream>

int main() {
  torch::manual_seed(0);
  const at::Tensor w = torch::randn({64, 128});
  auto [packed, state] = qlora::quantize_4bit(w, qlora::QuantConfig{64, "nf4", true});
  const at::Tensor back = qlora::dequantize_4bit(packed, state);
  const at::Tensor x = torch::randn({2, 128});
  const at::Tensor y = qlora::matmul_4bit(x, packed, state.float_absmax(), 64, "nf4", state.shape);
  const float err = (y - at::linear(x, back)).abs().max().item<float>();
  std::cout << "consumer: max |w - dequant| = " << (w - back).abs().max().item<float>()
            << ", matmul err = " << err << "\n";
  return err < 1e-4f ? 0 : 1;
}
