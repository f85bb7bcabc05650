// One QLoRA training step of a Llama-3.1-8B-shaped model on a GPU, with
// random weights made on the device (nothing to download): NF4 + double
// quantisation, LoRA on every linear layer, bf16 compute, gradient
// checkpointing, paged 8-bit AdamW. Prints one JSON line: tokens/s over
// the timed steps and the peak of LibTorch's CUDA allocator.
//
//   gpu_train_step [--layers 32] [--seq 2048] [--batch 2] [--rank 16]
//                  [--steps 5] [--warmup 2] [--selective]
//   gpu_train_step --cpu --tiny ...   # a dry run of this program on the CPU
// (benchmarks/bench_gpu.py runs it beside transformers + PEFT.)
#include <torch/cuda.h>
#include <torch/torch.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>

#include "qlora/models/llama.h"
#include "qlora/nn/qlora_linear.h"
#include "qlora/optim/paged_adamw.h"
#include "qlora/train/device.h"

namespace {

using Clock = std::chrono::steady_clock;

// Each Linear is drawn on the device and quantised at once: the dense
// weights never coexist (peak ~ one dense weight above the 4-bit model).
class QuantisedRandomWeights : public qlora::models::RandomLlamaWeights {
 public:
  QuantisedRandomWeights(const qlora::models::LlamaConfig& config, at::TensorOptions options,
                         qlora::nn::LoRAConfig lora, qlora::nn::QuantizedBaseConfig base)
      : RandomLlamaWeights(config, options), lora_(std::move(lora)), base_(std::move(base)) {}

  std::shared_ptr<torch::nn::Module> linear(const std::string& name, int64_t in, int64_t out,
                                            bool bias) override {
    auto dense = RandomLlamaWeights::linear(name, in, out, bias);
    if (name == "lm_head") return dense;  // QLoRA keeps the head dense and frozen
    auto* lin = dynamic_cast<torch::nn::LinearImpl*>(dense.get());
    TORCH_CHECK(lin, "gpu_train_step: ", name, " is not a Linear");
    return std::make_shared<qlora::nn::QLoRALinearImpl>(lin->weight.detach(), std::nullopt, lora_,
                                                        base_);
  }

 private:
  qlora::nn::LoRAConfig lora_;
  qlora::nn::QuantizedBaseConfig base_;
};

int64_t flag(int argc, char** argv, const char* name, int64_t fallback) {
  for (int i = 1; i + 1 < argc; ++i)
    if (std::strcmp(argv[i], name) == 0) return std::stoll(argv[i + 1]);
  return fallback;
}

bool has(int argc, char** argv, const char* name) {
  for (int i = 1; i < argc; ++i)
    if (std::strcmp(argv[i], name) == 0) return true;
  return false;
}

}  // namespace

int main(int argc, char** argv) {
  const bool cpu = has(argc, argv, "--cpu");
  if (!cpu && !torch::cuda::is_available()) {
    std::fprintf(stderr, "gpu_train_step: no CUDA device\n");
    return 77;
  }
  const c10::Device device = cpu ? c10::Device(c10::kCPU) : c10::Device(c10::kCUDA, 0);
  qlora::models::LlamaConfig c;  // Llama-3.1-8B
  c.vocab_size = 128256;
  c.hidden_size = 4096;
  c.intermediate_size = 14336;
  c.num_hidden_layers = flag(argc, argv, "--layers", 32);
  c.num_attention_heads = 32;
  c.num_key_value_heads = 8;
  c.rms_norm_eps = 1e-5;
  c.rope_theta = 500000.0;
  c.max_position_embeddings = 131072;
  if (has(argc, argv, "--tiny")) {  // the same code on a small model
    c.vocab_size = 1000;
    c.hidden_size = 256;
    c.intermediate_size = 512;
    c.num_attention_heads = 4;
    c.num_key_value_heads = 2;
  }
  const int64_t seq = flag(argc, argv, "--seq", 2048), batch = flag(argc, argv, "--batch", 2);
  const int64_t steps = flag(argc, argv, "--steps", 5), warmup = flag(argc, argv, "--warmup", 2);

  qlora::nn::LoRAConfig lora;
  lora.r = flag(argc, argv, "--rank", 16);
  lora.alpha = 2.0 * static_cast<double>(lora.r);
  lora.dropout = 0.0;
  qlora::nn::QuantizedBaseConfig base{qlora::QuantConfig{64, "nf4", true}, at::kBFloat16};

  torch::manual_seed(0);
  const auto t0 = Clock::now();
  QuantisedRandomWeights weights(c, at::TensorOptions().dtype(at::kBFloat16).device(device), lora,
                                 base);
  qlora::models::LlamaForCausalLM model(c, weights);
  for (auto& p : model->named_parameters())
    if (p.key().find("lora_") == std::string::npos) p.value().requires_grad_(false);
  model->set_gradient_checkpointing(true, has(argc, argv, "--selective"));
  model->train();
  const auto sync = [&] {
    if (!cpu) torch::cuda::synchronize();
  };
  sync();
  const double build_seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  const int64_t after_build = qlora::train::peak_device_allocated_bytes(device);

  std::vector<at::Tensor> params;
  for (auto& p : model->parameters())
    if (p.requires_grad()) params.push_back(p);
  qlora::optim::PagedAdamW opt(
      params, qlora::optim::PagedAdamWOptions(2e-4).optim_bits(8).paged(true).weight_decay(0.0));

  const at::Tensor ids = torch::randint(c.vocab_size, {batch, seq},
                                        at::TensorOptions().dtype(at::kLong).device(device));
  double timed = 0, last_loss = 0;
  for (int64_t s = 0; s < warmup + steps; ++s) {
    sync();
    const auto s0 = Clock::now();
    opt.zero_grad();
    const at::Tensor loss = model->summed_loss(ids, ids) / static_cast<double>(batch * (seq - 1));
    loss.backward();
    opt.step();
    last_loss = loss.item<double>();  // synchronises
    if (s >= warmup) timed += std::chrono::duration<double>(Clock::now() - s0).count();
  }
  const double tokens_per_second = static_cast<double>(steps * batch * seq) / timed;
  std::printf(
      "{\"tokens_per_second\": %.1f, \"step_seconds\": %.4f, \"peak_vram_bytes\": %lld, "
      "\"weights_vram_bytes\": %lld, \"build_seconds\": %.2f, \"loss\": %.4f, \"layers\": %lld, "
      "\"seq\": %lld, \"batch\": %lld, \"rank\": %lld, \"device\": \"%s\"}\n",
      tokens_per_second, timed / static_cast<double>(steps),
      static_cast<long long>(qlora::train::peak_device_allocated_bytes(device)),
      static_cast<long long>(after_build), build_seconds, last_loss,
      static_cast<long long>(c.num_hidden_layers), static_cast<long long>(seq),
      static_cast<long long>(batch), static_cast<long long>(lora.r),
      qlora::train::describe_device(device).c_str());
  return 0;
}
