// Test driver for the GGUF export tests (tests/python/test_gguf_export.py).
//   gguf_export_tool merged MODEL_PATH TOKENIZER_SOURCE OUT.gguf OUTTYPE [FLAGS]
//   gguf_export_tool adapter MODEL_PATH OUT.gguf [FLAGS]
// FLAGS: --lora-random SEED (LoRA r=8, alpha=16 on every q/k/v/o/gate/up/down
// projection with a random B drawn from SEED), --rslora, --dora, --r R,
// --alpha A, --quantize (NF4 base). Besides OUT.gguf it writes
// OUT.merged.safetensors (our merged weights, Hugging Face names, float32,
// no Q/K permutation) and OUT.logits.safetensors ("logits": our model's
// float32 logits on input ids 0..15, shape [1, 16, vocab]).
//   gguf_export_tool logits MODEL_PATH IDS OUT.safetensors
// writes "logits" [1, n, vocab] of the model at MODEL_PATH as loaded (a GGUF's
// quantised tensors dequantised exactly, nothing re-quantised) on the
// comma-separated token ids IDS.
#include <torch/torch.h>

#include <algorithm>
#include <iostream>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "qlora/export/gguf_model.h"
#include "qlora/io/safetensors.h"
#include "qlora/models/loader.h"
#include "qlora/nn/apply_lora.h"
#include "qlora/nn/lora_layer.h"

namespace {

int usage() {
  std::cerr << "usage: gguf_export_tool merged MODEL_PATH TOKENIZER_SOURCE OUT.gguf OUTTYPE "
               "[--lora-random SEED] [--rslora] [--dora] [--r R] [--alpha A] [--quantize]\n"
               "       gguf_export_tool adapter MODEL_PATH OUT.gguf [same flags]\n"
               "       gguf_export_tool logits MODEL_PATH IDS OUT.safetensors\n";
  return 2;
}

}  // namespace

// Logits of a model as stored, on given ids (the llama.cpp comparison).
int logits_mode(const std::string& model_path, const std::string& ids_csv, const std::string& out) {
  std::vector<int64_t> ids;
  for (size_t pos = 0; pos < ids_csv.size();) {
    const size_t comma = std::min(ids_csv.find(',', pos), ids_csv.size());
    ids.push_back(std::stoll(ids_csv.substr(pos, comma - pos)));
    pos = comma + 1;
  }
  qlora::models::LlamaForCausalLM model = qlora::models::load_llama(model_path);
  model->eval();
  torch::NoGradGuard no_grad;
  const at::Tensor logits =
      model->forward(torch::tensor(ids, torch::kLong).unsqueeze(0)).to(torch::kFloat).contiguous();
  qlora::io::save_safetensors(out, std::map<std::string, at::Tensor>{{"logits", logits}});
  return 0;
}

int main(int argc, char** argv) {
  if (argc < 2) return usage();
  const std::string mode = argv[1];
  if (mode == "logits") {
    if (argc != 5) return usage();
    try {
      return logits_mode(argv[2], argv[3], argv[4]);
    } catch (const std::exception& e) {
      std::cerr << "error: " << e.what() << "\n";
      return 1;
    }
  }
  std::vector<std::string> pos;
  std::optional<uint64_t> seed;
  bool rslora = false, dora = false, quantize = false;
  int64_t r = 8;
  double alpha = 16.0;
  for (int i = 2; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--lora-random" && i + 1 < argc) {
      seed = std::stoull(argv[++i]);
    } else if (a == "--rslora") {
      rslora = true;
    } else if (a == "--dora") {
      dora = true;
    } else if (a == "--quantize") {
      quantize = true;
    } else if (a == "--r" && i + 1 < argc) {
      r = std::stoll(argv[++i]);
    } else if (a == "--alpha" && i + 1 < argc) {
      alpha = std::stod(argv[++i]);
    } else {
      pos.push_back(a);
    }
  }
  if (!((mode == "merged" && pos.size() == 4) || (mode == "adapter" && pos.size() == 2))) {
    return usage();
  }
  try {
    qlora::models::LoadOptions options;
    if (seed) {
      qlora::nn::LoRAConfig lora;
      lora.r = r;
      lora.alpha = alpha;
      lora.use_rslora = rslora;
      lora.use_dora = dora;
      lora.target_modules = {"q_proj",    "k_proj",  "v_proj",   "o_proj",
                             "gate_proj", "up_proj", "down_proj"};
      options.lora = lora;
    }
    if (quantize) options.quantize = qlora::nn::QuantizedBaseConfig{};
    qlora::models::LlamaForCausalLM model = qlora::models::load_llama(pos[0], options);
    model->eval();
    torch::NoGradGuard no_grad;
    if (seed) {
      torch::manual_seed(*seed);
      for (auto& [path, layer] : qlora::nn::lora_layers(*model)) {
        layer->lora_A.copy_(torch::randn_like(layer->lora_A) * 0.1);
        layer->lora_B.copy_(torch::randn_like(layer->lora_B) * 0.05);
      }
    }
    const std::string out = mode == "merged" ? pos[2] : pos[1];
    if (mode == "merged") {
      qlora::models::export_gguf_merged(model, pos[1], out, pos[3]);
    } else {
      qlora::models::export_gguf_adapter(model, out);
    }
    qlora::io::save_safetensors(out + ".merged.safetensors",
                                qlora::models::merged_hf_weights(model));
    const at::Tensor ids = torch::arange(16, torch::kLong).unsqueeze(0);
    const at::Tensor logits = model->forward(ids).to(torch::kFloat).contiguous();
    qlora::io::save_safetensors(out + ".logits.safetensors",
                                std::map<std::string, at::Tensor>{{"logits", logits}});
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
