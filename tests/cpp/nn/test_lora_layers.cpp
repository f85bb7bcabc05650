// QLoRALinear / LoRALinear / apply_lora / PEFT adapter files / TorchScript.
#include <gtest/gtest.h>
#include <torch/script.h>
#include <torch/torch.h>
#include <unistd.h>

#include "qlora/export/torchscript.h"
#include "qlora/nn/apply_lora.h"
#include "qlora/nn/linear_host.h"
#include "qlora/nn/lora_linear.h"
#include "qlora/nn/peft_adapter.h"
#include "qlora/nn/qlora_linear.h"
#include "qlora/ops.h"
#include "test_utils.h"

namespace {

using namespace qlora::nn;
using qlora::test::expect_error;

LoRAConfig lora(int64_t r = 4, double alpha = 8, bool dora = false, bool rslora = false) {
  LoRAConfig c;
  c.r = r;
  c.alpha = alpha;
  c.use_dora = dora;
  c.use_rslora = rslora;
  c.target_modules = {"all-linear"};
  return c;
}

QuantizedBaseConfig nf4(bool dq = true, at::ScalarType compute = at::kFloat) {
  return {qlora::QuantConfig{64, "nf4", dq}, compute};
}

// Randomises B so the adapter does something.
void perturb(LoRALayerImpl& layer, double scale = 0.05) {
  torch::NoGradGuard g;
  layer.lora_B.copy_(torch::randn_like(layer.lora_B) * scale);
  if (layer.lora_magnitude_vector.defined())
    layer.lora_magnitude_vector.mul_(1 + 0.1 * torch::rand_like(layer.lora_magnitude_vector));
}

TEST(QLoRALinear, BaseIsBuffersAndOnlyTheAdapterTrains) {
  torch::manual_seed(0);
  QLoRALinear layer(torch::randn({32, 64}), torch::randn({32}), lora(), nf4());
  std::set<std::string> params;
  for (const auto& p : layer->named_parameters()) params.insert(p.key());
  EXPECT_EQ(params, (std::set<std::string>{"lora_A", "lora_B"}));
  std::set<std::string> buffers;
  for (const auto& b : layer->named_buffers()) buffers.insert(b.key());
  EXPECT_EQ(buffers,
            (std::set<std::string>{"weight", "weight_absmax", "weight_quant_map",
                                   "weight_nested_absmax", "weight_nested_quant_map", "bias"}));
  EXPECT_EQ(layer->lora_A.sizes(), (at::IntArrayRef{4, 64}));
  EXPECT_EQ(layer->lora_B.sizes(), (at::IntArrayRef{32, 4}));
  EXPECT_EQ(layer->num_trainable_parameters(), 4 * 64 + 32 * 4);

  const at::Tensor weight_before = layer->packed_weight().clone();
  const at::Tensor bias_before = layer->base_bias()->clone();
  const at::Tensor a_before = layer->lora_A.clone();
  torch::optim::AdamW opt(layer->parameters(), torch::optim::AdamWOptions(1e-2));
  for (int step = 0; step < 3; ++step) {
    opt.zero_grad();
    layer->forward(torch::randn({8, 64})).pow(2).mean().backward();
    opt.step();
  }
  EXPECT_TRUE(at::equal(layer->packed_weight(), weight_before));
  EXPECT_TRUE(at::equal(*layer->base_bias(), bias_before));
  EXPECT_FALSE(layer->packed_weight().requires_grad());
  EXPECT_FALSE(at::equal(layer->lora_A, a_before));
  EXPECT_GT(layer->lora_B.abs().sum().item<float>(), 0.f);
}

TEST(QLoRALinear, FreshAdapterIsAnExactNoOp) {
  torch::manual_seed(1);
  for (auto compute : {at::kFloat, at::kBFloat16}) {
    QLoRALinear layer(torch::randn({16, 128}), torch::randn({16}), lora(), nf4(true, compute));
    const at::Tensor x = torch::randn({3, 5, 128});
    const at::Tensor base = layer->base_forward(x);
    EXPECT_TRUE(at::equal(layer->forward(x), base));
    EXPECT_EQ(layer->forward(x).sizes(), (at::IntArrayRef{3, 5, 16}));
  }
}

TEST(QLoRALinear, ForwardEqualsMergedWeightAndScalingRules) {
  torch::manual_seed(2);
  for (bool dora : {false, true}) {
    for (bool rslora : {false, true}) {
      const LoRAConfig c = lora(8, 16, dora, rslora);
      EXPECT_DOUBLE_EQ(c.scaling(), rslora ? 16 / std::sqrt(8.0) : 2.0);
      QLoRALinear layer(torch::randn({24, 64}), torch::randn({24}), c, nf4());
      perturb(*layer);
      layer->eval();
      const at::Tensor x = torch::randn({6, 64});
      const at::Tensor merged = at::linear(x, layer->merged_weight(), *layer->base_bias());
      EXPECT_TRUE(at::allclose(layer->forward(x), merged, 1e-4, 1e-5))
          << "dora=" << dora << " rslora=" << rslora;
      torch::nn::Linear plain = layer->merge_and_unload();
      EXPECT_TRUE(at::allclose(plain->forward(x), merged, 1e-5, 1e-6));
    }
  }
}

TEST(QLoRALinear, MergeUsesTheDequantizedWeightNotTheOriginal) {
  torch::manual_seed(3);
  const at::Tensor w = torch::randn({8, 64});
  QLoRALinear layer(w, std::nullopt, lora(), nf4(false));
  perturb(*layer);
  const at::Tensor delta = layer->scaling() * layer->lora_B.matmul(layer->lora_A);
  const at::Tensor deq = qlora::dequantize_4bit(layer->packed_weight(), layer->quant_state());
  EXPECT_TRUE(at::allclose(layer->merged_weight(), deq + delta));
  EXPECT_FALSE(at::allclose(layer->merged_weight(), w + delta, 1e-3, 1e-3));
}

TEST(QLoRALinear, RequantizingTheMergedWeightReportsItsError) {
  torch::manual_seed(4);
  QLoRALinear layer(torch::randn({64, 256}) * 0.02, std::nullopt, lora(), nf4());
  perturb(*layer, 0.01);
  const auto r = layer->requantize_merged({64, "nf4", true});
  EXPECT_GT(r.max_abs_error, 0);
  EXPECT_LT(r.relative_rms_error, 0.15);  // NF4's typical error on Gaussian weights is ~10%
  const at::Tensor back = qlora::dequantize_4bit(r.packed, r.state);
  EXPECT_NEAR((back - layer->merged_weight()).abs().max().item<double>(), r.max_abs_error, 1e-7);
}

TEST(QLoRALinear, DropoutOnlyInTraining) {
  torch::manual_seed(5);
  LoRAConfig c = lora();
  c.dropout = 0.5;
  QLoRALinear layer(torch::randn({16, 64}), std::nullopt, c, nf4());
  perturb(*layer);
  const at::Tensor x = torch::randn({4, 64});
  layer->eval();
  EXPECT_TRUE(at::equal(layer->forward(x), layer->forward(x)));
  layer->train();
  EXPECT_FALSE(at::equal(layer->forward(x), layer->forward(x)));
}

TEST(QLoRALinear, FromABitsandbytesStateWithoutRequantizing) {
  torch::manual_seed(6);
  auto [packed, state] = qlora::quantize_4bit(torch::randn({16, 64}), {64, "fp4", true});
  QLoRALinear layer(packed, state, std::nullopt, lora(), at::kFloat);
  EXPECT_EQ(layer->packed_weight().data_ptr(), packed.data_ptr());
  const auto sd = layer->base_state_dict("w");
  EXPECT_TRUE(sd.count("w.quant_state.bitsandbytes__fp4"));
  EXPECT_TRUE(at::equal(layer->base_weight(at::kFloat), qlora::dequantize_4bit(packed, state)));
}

TEST(LoRALinear, SharesTheAdapterCodePathWithQLoRA) {
  torch::manual_seed(7);
  const at::Tensor w = torch::randn({12, 32}), b = torch::randn({12});
  LoRALinear dense(w, b, lora(4, 8, /*dora=*/true));
  perturb(*dense);
  const at::Tensor x = torch::randn({5, 32});
  EXPECT_TRUE(
      at::allclose(dense->forward(x), at::linear(x, dense->merged_weight(), b), 1e-4, 1e-5));
  EXPECT_EQ(dense->num_trainable_parameters(), 4 * 32 + 12 * 4 + 12);  // A, B, magnitude
}

// A small attention/MLP-shaped tree whose Linears sit in LinearHost slots.
struct Attention : LinearHost {
  LinearRef q_proj, k_proj, v_proj, o_proj;
  Attention() {
    register_linear("q_proj", torch::nn::Linear(16, 16).ptr(), q_proj);
    register_linear("k_proj", torch::nn::Linear(16, 8).ptr(), k_proj);
    register_linear("v_proj", torch::nn::Linear(16, 8).ptr(), v_proj);
    register_linear("o_proj", torch::nn::Linear(16, 16).ptr(), o_proj);
  }
  at::Tensor forward(const at::Tensor& x) {
    return o_proj(q_proj(x) * torch::cat({k_proj(x), v_proj(x)}, -1).sigmoid());
  }
};
struct Block : torch::nn::Module {
  std::shared_ptr<Attention> self_attn =
      register_module("self_attn", std::make_shared<Attention>());
  torch::nn::LayerNorm norm =
      register_module("norm", torch::nn::LayerNorm(std::vector<int64_t>{16}));
  at::Tensor forward(const at::Tensor& x) { return self_attn->forward(norm->forward(x)); }
};
struct Tiny : LinearHost {
  std::shared_ptr<Block> block = register_module("block", std::make_shared<Block>());
  LinearRef lm_head;
  Tiny() { register_linear("lm_head", torch::nn::Linear(16, 32).ptr(), lm_head); }
  at::Tensor forward(const at::Tensor& x) { return lm_head(block->forward(x)); }
};

std::vector<std::string> replaced(LoRAConfig c) {
  Tiny model;
  return apply_lora(model, c).replaced;
}

TEST(ApplyLora, EveryKindOfTargetSpec) {
  LoRAConfig c = lora();
  c.target_modules = {"q_proj", "v_proj"};  // suffixes
  EXPECT_EQ(replaced(c),
            (std::vector<std::string>{"block.self_attn.q_proj", "block.self_attn.v_proj"}));
  c.target_modules = {"block.self_attn.k_proj"};  // exact name
  EXPECT_EQ(replaced(c), (std::vector<std::string>{"block.self_attn.k_proj"}));
  c.target_modules = {"all-linear"};  // every Linear but the output layer
  EXPECT_EQ(replaced(c).size(), 4u);
  c.target_regex = R"(.*\.(q|o)_proj)";
  EXPECT_EQ(replaced(c),
            (std::vector<std::string>{"block.self_attn.q_proj", "block.self_attn.o_proj"}));
  c.target_regex.clear();
  c.target_modules = {"lm_head"};
  EXPECT_EQ(replaced(c), (std::vector<std::string>{"lm_head"}));
  c.target_modules = {"proj"};  // a suffix must be a whole name component
  expect_error([&] { replaced(c); }, "no module matches the LoRA targets");
}

TEST(ApplyLora, QuantizesFreezesAndKeepsOutputs) {
  torch::manual_seed(8);
  Tiny model;
  const at::Tensor x = torch::randn({2, 3, 16});
  const at::Tensor before = model.forward(x);
  const auto report = apply_lora(model, lora(), nf4(false));
  EXPECT_EQ(report.replaced.size(), 4u);
  for (const auto& p : model.named_parameters()) {
    const std::string& n = p.key();
    const bool adapter = n.find("lora_") != std::string::npos;
    EXPECT_EQ(p.value().requires_grad(), adapter) << n;
  }
  EXPECT_EQ(lora_layers(model).size(), 4u);
  // Only quantisation error separates the outputs: a fresh adapter adds nothing.
  EXPECT_TRUE(at::allclose(model.forward(x), before, 0.2, 0.2));
  std::ostringstream s;
  s << report;
  EXPECT_NE(s.str().find("LoRA on 4 modules"), std::string::npos);
}

TEST(ApplyLora, LinearOutsideAHostSlotIsAnError) {
  struct Plain : torch::nn::Module {
    torch::nn::Linear fc = register_module("fc", torch::nn::Linear(4, 4));
  } plain;
  LoRAConfig c = lora();
  expect_error([&] { apply_lora(plain, c); }, "not a qlora::nn::LinearHost slot");
}

std::string temp_dir() {
  char tmpl[] = "/tmp/qlora_test_XXXXXX";
  return mkdtemp(tmpl);
}

TEST(PeftAdapter, SaveLoadRoundTripAndPreciseErrors) {
  torch::manual_seed(9);
  LoRAConfig c = lora(4, 8, /*dora=*/true);
  c.target_modules = {"q_proj", "o_proj"};
  Tiny a;
  apply_lora(a, c, nf4());
  for (auto& [name, layer] : lora_layers(a)) perturb(*layer);
  const std::string dir = temp_dir();
  save_peft_adapter(dir, a, c, {"tiny-test"});
  AdapterMetadata meta;
  const LoRAConfig back = read_peft_adapter_config(dir, &meta);
  EXPECT_EQ(back.r, 4);
  EXPECT_TRUE(back.use_dora);
  EXPECT_EQ(back.target_modules, c.target_modules);
  EXPECT_EQ(meta.base_model_name_or_path, "tiny-test");
  const auto keys = peft_state_dict(a);
  EXPECT_TRUE(keys.count("base_model.model.block.self_attn.q_proj.lora_A.weight"));
  EXPECT_TRUE(keys.count("base_model.model.block.self_attn.o_proj.lora_magnitude_vector"));

  Tiny b;
  torch::manual_seed(9);
  Tiny same_base;  // same seed: same base weights as `a`
  apply_lora(same_base, back, nf4());
  load_peft_adapter(dir, same_base);
  const at::Tensor x = torch::randn({2, 16});
  a.eval();
  same_base.eval();
  EXPECT_TRUE(at::allclose(a.forward(x), same_base.forward(x), 1e-5, 1e-6));

  LoRAConfig other = c;
  other.r = 8;
  apply_lora(b, other, nf4());
  expect_error([&] { load_peft_adapter(dir, b); },
               "base_model.model.block.self_attn.q_proj.lora_A.weight has shape [4, 16], the model "
               "expects [8, 16]");
}

TEST(TorchScript, ExportedQLoRAModelMatchesAndRoundTrips) {
  torch::manual_seed(10);
  torch::nn::Sequential model(
      QLoRALinear(torch::randn({32, 16}), torch::randn({32}), lora(), nf4()), torch::nn::GELU(),
      QLoRALinear(torch::randn({8, 32}), std::nullopt, lora(4, 8, true), nf4(false)),
      torch::nn::ReLU(), LoRALinear(torch::randn({4, 8}), torch::randn({4}), lora()));
  for (auto& [name, layer] : lora_layers(*model)) perturb(*layer);
  model->eval();
  const at::Tensor x = torch::randn({3, 16});
  const at::Tensor expected = model->forward(x);
  torch::jit::Module scripted = qlora::exporters::script_module(*model);
  EXPECT_TRUE(at::allclose(scripted.forward({x}).toTensor(), expected, 1e-5, 1e-6));
  const std::string path = temp_dir() + "/model.pt";
  scripted.save(path);
  torch::jit::Module loaded = torch::jit::load(path);
  EXPECT_TRUE(at::allclose(loaded.forward({x}).toTensor(), expected, 1e-5, 1e-6));
  expect_error(
      [&] {
        torch::nn::Sequential bad(torch::nn::Conv1d(1, 1, 1));
        qlora::exporters::script_module(*bad);
      },
      "no exporter for module");
}

}  // namespace
