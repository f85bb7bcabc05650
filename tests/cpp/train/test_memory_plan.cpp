// The memory plan (qlora plan / train --dry-run): its weight, adapter,
// gradient and optimizer figures are what loading the model and running the
// optimizer really allocate, for each kind of base.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <c10/util/StringUtil.h>

#include <set>

#include "qlora/io/gguf_writer.h"
#include "qlora/io/safetensors.h"
#include "qlora/models/gguf_qk_permutation.h"
#include "qlora/models/loader.h"
#include "qlora/optim/paged_adamw.h"
#include "qlora/quant_state.h"
#include "qlora/train/config.h"
#include "qlora/train/memory_plan.h"
#include "test_utils.h"
#include "tiny_llama.h"

namespace {

using namespace qlora;
using qlora::test::TempDir;

models::LlamaConfig plan_config() {
  models::LlamaConfig c = qlora::test::tiny_llama_config();
  c.intermediate_size = 64;  // whole 32-element blocks for the GGUF case
  c.model_type = "qwen2";    // q/k/v biases
  return c;
}

// The model as an HF folder and as a Q8_0 GGUF.
struct Checkpoints {
  TempDir dir;
  std::string hf, gguf;
};

void write_checkpoints(Checkpoints& ck) {
  torch::manual_seed(0);
  models::LlamaConfig c = plan_config();
  models::LlamaForCausalLM m(c);
  ck.hf = ck.dir.path();
  ck.dir.write("config.json", c.to_json());
  std::map<std::string, at::Tensor> tensors;
  for (const auto& p : m->named_parameters()) tensors[p.key()] = p.value().detach();
  // Written empty first so that TempDir removes them; then replaced.
  io::save_safetensors(ck.dir.write("model.safetensors", ""), tensors);
  ck.gguf = ck.dir.write("model.gguf", "");
  c.model_type = "llama";  // GGUF llama: no biases; those tensors are left out
  c.eos_token_ids = {};
  io::GgufWriter w;
  w.add_string("general.architecture", "llama");
  w.add_u32("llama.block_count", static_cast<uint32_t>(c.num_hidden_layers));
  w.add_u32("llama.embedding_length", static_cast<uint32_t>(c.hidden_size));
  w.add_u32("llama.feed_forward_length", static_cast<uint32_t>(c.intermediate_size));
  w.add_u32("llama.attention.head_count", static_cast<uint32_t>(c.num_attention_heads));
  w.add_u32("llama.attention.head_count_kv", static_cast<uint32_t>(c.num_key_value_heads));
  const std::pair<const char*, const char*> names[] = {
      {"self_attn.q_proj", "attn_q"},          {"self_attn.k_proj", "attn_k"},
      {"self_attn.v_proj", "attn_v"},          {"self_attn.o_proj", "attn_output"},
      {"mlp.gate_proj", "ffn_gate"},           {"mlp.up_proj", "ffn_up"},
      {"mlp.down_proj", "ffn_down"},           {"input_layernorm", "attn_norm"},
      {"post_attention_layernorm", "ffn_norm"}};
  w.add_tensor("token_embd.weight", tensors.at("model.embed_tokens.weight"), io::GgmlType::Q8_0);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    for (const auto& [hf, g] : names) {
      const at::Tensor t = tensors.at("model.layers." + std::to_string(l) + "." + hf + ".weight");
      w.add_tensor("blk." + std::to_string(l) + "." + g + ".weight", t,
                   t.dim() == 2 ? io::GgmlType::Q8_0 : io::GgmlType::F32);
    }
  }
  w.add_tensor("output_norm.weight", tensors.at("model.norm.weight"), io::GgmlType::F32);
  w.add_tensor("output.weight", tensors.at("lm_head.weight"), io::GgmlType::Q8_0);
  w.write(ck.gguf);
}

train::TrainConfig config_for(const std::string& path, const std::vector<std::string>& sets) {
  std::vector<std::string> all = {"model.path=" + path, "data.train=unused.jsonl",
                                  "lora.target_modules=[q_proj, v_proj, down_proj]",
                                  "training.micro_batch_size=2", "data.max_length=16"};
  all.insert(all.end(), sets.begin(), sets.end());
  return train::TrainConfig::from_yaml_string("{}", all, "test");
}

// Loads `cfg`'s model as ModelContext does and measures what the plan predicts.
struct Measured {
  int64_t weights = 0, trainable = 0, optimizer = 0;
};

Measured measure(const train::TrainConfig& cfg) {
  models::LoadOptions load;
  load.lora = cfg.lora;
  load.format = cfg.model.format;
  if (cfg.model.base_format == "gguf-native")
    load.gguf_native = models::LoadOptions::GgufNativeBase{};
  else if (cfg.model.quantize)
    load.quantize = nn::QuantizedBaseConfig{
        QuantConfig{cfg.model.blocksize, cfg.model.quant_type, cfg.model.double_quant}, at::kFloat};
  auto model = models::load_llama(cfg.model.path, load);
  Measured m;
  std::set<const void*> seen;  // tied weights count once
  std::vector<at::Tensor> params;
  for (const auto& p : model->named_parameters()) {
    if (!seen.insert(p.value().unsafeGetTensorImpl()).second) continue;
    m.weights += p.value().numel() * p.value().element_size();
    if (p.value().requires_grad()) {
      m.trainable += p.value().numel();
      params.push_back(p.value());
    }
  }
  for (const auto& b : model->named_buffers()) {
    if (b.key().find("inv_freq") != std::string::npos) continue;  // RoPE's few floats
    if (!seen.insert(b.value().unsafeGetTensorImpl()).second) continue;
    m.weights += b.value().numel() * b.value().element_size();
  }
  for (auto& p : params) p.mutable_grad() = torch::ones_like(p);
  optim::PagedAdamW opt(params,
                        optim::PagedAdamWOptions(1e-3)
                            .optim_bits(cfg.training.optimizer == "paged_adamw_8bit" ? 8 : 32)
                            .paged(true));
  opt.step();
  m.optimizer = opt.state_bytes();
  return m;
}

TEST(MemoryPlan, WeightsAdapterAndOptimizerAreWhatTheRunAllocates) {
  Checkpoints ck;
  write_checkpoints(ck);
  const std::vector<std::pair<std::string, std::vector<std::string>>> cases = {
      {ck.hf, {}},  // NF4, double quant
      {ck.hf, {"model.double_quant=false", "model.blocksize=32"}},
      {ck.hf, {"model.quantize=false"}},  // plain LoRA
      {ck.hf, {"training.optimizer=paged_adamw_32bit", "lora.use_dora=true"}},
      {ck.hf, {"lora.target_modules=[all-linear]", "lora.r=64"}},  // 8-bit states for big tensors
      {ck.gguf, {"model.base_format=gguf-native"}},
      {ck.gguf, {}},  // re-quantised GGUF
  };
  for (const auto& [path, sets] : cases) {
    const train::TrainConfig cfg = config_for(path, sets);
    const train::MemoryPlan plan = train::plan_memory(cfg);
    const Measured m = measure(cfg);
    const std::string what = path + " " + c10::Join(" ", sets);
    EXPECT_EQ(plan.weights_bytes, m.weights) << what << "\n" << train::format_memory_plan(plan);
    EXPECT_EQ(plan.adapter_parameters, m.trainable) << what;
    EXPECT_EQ(plan.gradient_bytes, m.trainable * 4) << what;
    EXPECT_EQ(plan.optimizer_bytes, m.optimizer) << what;
    EXPECT_GT(plan.activation_bytes_without_checkpointing, plan.activation_bytes_with_checkpointing)
        << what;
    EXPECT_EQ(plan.peak_bytes, plan.weights_bytes + plan.gradient_bytes + plan.optimizer_bytes +
                                   plan.activation_bytes);
  }
}

TEST(MemoryPlan, ReadsNoTensorAndSaysWhetherItFits) {
  Checkpoints ck;
  write_checkpoints(ck);
  // A 7B-shaped config.json with no weights beside it: the plan needs only the shapes.
  TempDir seven;
  models::LlamaConfig c;  // LlamaConfig's defaults are Llama-2-7B's shapes
  seven.write("config.json", c.to_json());
  const train::MemoryPlan p = train::plan_memory(config_for(
      seven.path(), {"lora.target_modules=[all-linear]", "lora.r=16", "data.max_length=256",
                     "training.micro_batch_size=1", "training.gradient_checkpointing=true"}));
  // NF4 with double quantisation: about 0.5 bytes per weight of the 6.5 G in Linears.
  EXPECT_GT(p.items[0].bytes, int64_t{3150} << 20);
  EXPECT_LT(p.items[0].bytes, int64_t{3250} << 20);
  EXPECT_EQ(p.adapter_parameters, 39976960);  // PEFT's count for r 16 on all linear layers
  const std::string text = train::format_memory_plan(p);
  EXPECT_NE(text.find("peak (estimate)"), std::string::npos) << text;
  EXPECT_NE(text.find(p.fits() ? "fits" : "DOES NOT FIT"), std::string::npos) << text;
  qlora::test::expect_error([&] { train::plan_memory(config_for(ck.dir.path() + "/nope", {})); },
                            "nope");
}

}  // namespace
