// Test driver for the PEFT and TorchScript conformance tests.
//   lora_tool peft WEIGHTS CONFIG_DIR INPUTS OUT [--quant] [--load DIR] [--save DIR]
//     builds a one-layer LLaMA-shaped block (HF module names) from dense
//     WEIGHTS, applies the adapter_config.json in CONFIG_DIR (QLoRA NF4 with
//     --quant), loads an adapter from DIR or randomises B, runs x through it,
//     back-propagates sum(y * g), and writes y, the base weights it used and
//     the adapter gradients (PEFT key names + ".grad") to OUT.
//   lora_tool script MODEL_PT OUT
//     exports a QLoRA/DoRA Sequential to TorchScript and writes x and y.
#include <torch/torch.h>

#include <iostream>
#include <map>
#include <string>

#include "qlora/export/torchscript.h"
#include "qlora/io/safetensors.h"
#include "qlora/nn/apply_lora.h"
#include "qlora/nn/linear_host.h"
#include "qlora/nn/peft_adapter.h"
#include "qlora/nn/qlora_linear.h"

namespace {

using namespace qlora::nn;
using Weights = std::map<std::string, at::Tensor>;

std::shared_ptr<torch::nn::Module> linear(const Weights& w, const std::string& path) {
  const at::Tensor& weight = w.at(path + ".weight");
  torch::nn::Linear l(
      torch::nn::LinearOptions(weight.size(1), weight.size(0)).bias(w.count(path + ".bias") != 0));
  torch::NoGradGuard g;
  l->weight.copy_(weight);
  if (l->bias.defined()) l->bias.copy_(w.at(path + ".bias"));
  return l.ptr();
}

struct Attention : LinearHost {
  LinearRef q_proj, k_proj, v_proj, o_proj;
  Attention(const Weights& w, const std::string& p) {
    register_linear("q_proj", linear(w, p + ".q_proj"), q_proj);
    register_linear("k_proj", linear(w, p + ".k_proj"), k_proj);
    register_linear("v_proj", linear(w, p + ".v_proj"), v_proj);
    register_linear("o_proj", linear(w, p + ".o_proj"), o_proj);
  }
  at::Tensor forward(const at::Tensor& x) {
    return o_proj(q_proj(x) * torch::cat({k_proj(x), v_proj(x)}, -1).sigmoid());
  }
};

struct Mlp : LinearHost {
  LinearRef gate_proj, up_proj, down_proj;
  Mlp(const Weights& w, const std::string& p) {
    register_linear("gate_proj", linear(w, p + ".gate_proj"), gate_proj);
    register_linear("up_proj", linear(w, p + ".up_proj"), up_proj);
    register_linear("down_proj", linear(w, p + ".down_proj"), down_proj);
  }
  at::Tensor forward(const at::Tensor& x) {
    return down_proj(torch::silu(gate_proj(x)) * up_proj(x));
  }
};

struct Layer : torch::nn::Module {
  std::shared_ptr<Attention> self_attn;
  std::shared_ptr<Mlp> mlp;
  Layer(const Weights& w, const std::string& p) {
    self_attn = register_module("self_attn", std::make_shared<Attention>(w, p + ".self_attn"));
    mlp = register_module("mlp", std::make_shared<Mlp>(w, p + ".mlp"));
  }
  at::Tensor forward(const at::Tensor& x) {
    const at::Tensor h = x + self_attn->forward(x);
    return h + mlp->forward(h);
  }
};

struct Inner : torch::nn::Module {
  torch::nn::ModuleList layers = register_module("layers", torch::nn::ModuleList());
};

struct Model : torch::nn::Module {
  std::shared_ptr<Inner> model = register_module("model", std::make_shared<Inner>());
  std::shared_ptr<Layer> layer0;
  explicit Model(const Weights& w) {
    layer0 = std::make_shared<Layer>(w, "model.layers.0");
    model->layers->push_back(layer0);
  }
  at::Tensor forward(const at::Tensor& x) { return layer0->forward(x); }
};

int run_peft(int argc, char** argv) {
  const Weights weights = qlora::io::SafetensorsReader::open(argv[2]).load_all();
  const LoRAConfig config = read_peft_adapter_config(argv[3]);
  const Weights inputs = qlora::io::SafetensorsReader::open(argv[4]).load_all();
  std::string load_dir, save_dir;
  bool quant = false;
  for (int i = 6; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--quant")
      quant = true;
    else if (a == "--load" && i + 1 < argc)
      load_dir = argv[++i];
    else if (a == "--save" && i + 1 < argc)
      save_dir = argv[++i];
    else
      throw std::runtime_error("unknown argument " + a);
  }
  Model model(weights);
  std::optional<QuantizedBaseConfig> base;
  if (quant) base = QuantizedBaseConfig{{64, "nf4", true}, at::kFloat};
  apply_lora(model, config, base);
  if (!load_dir.empty()) {
    load_peft_adapter(load_dir, model);
  } else {
    torch::manual_seed(1234);
    torch::NoGradGuard g;
    for (auto& [name, layer] : lora_layers(model)) {
      layer->lora_B.copy_(torch::randn_like(layer->lora_B) * 0.1);
      if (layer->lora_magnitude_vector.defined())
        layer->lora_magnitude_vector.mul_(1 + 0.2 * torch::rand_like(layer->lora_magnitude_vector));
    }
  }
  if (!save_dir.empty()) save_peft_adapter(save_dir, model, config, {"lora_tool"});
  model.eval();
  const at::Tensor y = model.forward(inputs.at("x"));
  (y * inputs.at("g")).sum().backward();

  Weights out{{"y", y.detach()}};
  for (auto& [path, layer] : lora_layers(model)) {
    out[path + ".weight"] = layer->base_weight(at::kFloat);
    const std::string key = "base_model.model." + path;
    out[key + ".lora_A.weight.grad"] = layer->lora_A.grad();
    out[key + ".lora_B.weight.grad"] = layer->lora_B.grad();
    if (layer->lora_magnitude_vector.defined())
      out[key + ".lora_magnitude_vector.grad"] = layer->lora_magnitude_vector.grad();
  }
  for (auto& [key, t] : peft_state_dict(model)) out[key] = t;
  qlora::io::save_safetensors(argv[5], out);
  return 0;
}

int run_script(char** argv) {
  torch::manual_seed(7);
  LoRAConfig lora;
  lora.r = 4;
  lora.alpha = 8;
  LoRAConfig dora = lora;
  dora.use_dora = true;
  const QuantizedBaseConfig nf4{{64, "nf4", true}, at::kFloat};
  torch::nn::Sequential model(QLoRALinear(torch::randn({32, 64}), torch::randn({32}), lora, nf4),
                              torch::nn::GELU(),
                              QLoRALinear(torch::randn({16, 32}), std::nullopt, dora, nf4));
  {
    torch::NoGradGuard g;
    for (auto& [name, layer] : lora_layers(*model))
      layer->lora_B.copy_(torch::randn_like(layer->lora_B) * 0.1);
  }
  model->eval();
  const at::Tensor x = torch::randn({3, 64});
  torch::NoGradGuard g;
  qlora::exporters::script_module(*model).save(argv[2]);
  qlora::io::save_safetensors(argv[3], Weights{{"x", x}, {"y", model->forward(x)}});
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const std::string verb = argc > 1 ? argv[1] : "";
    if (verb == "peft" && argc >= 6) return run_peft(argc, argv);
    if (verb == "script" && argc == 4) return run_script(argv);
    std::cerr << "usage: lora_tool peft WEIGHTS CONFIG_DIR INPUTS OUT [--quant] [--load DIR] "
                 "[--save DIR]\n       lora_tool script MODEL_PT OUT\n";
    return 2;
  } catch (const c10::Error& e) {
    std::cerr << "error: " << e.what_without_backtrace() << "\n";
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
  }
  return 1;
}
