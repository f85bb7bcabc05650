// LlamaForCausalLM: module layout, masking, KV cache, GQA, gradient
// checkpointing, generation, config parsing and checkpoint loading.
// Parity with transformers is tests/python/test_llama_parity.py.
#if defined(__SANITIZE_ADDRESS__)
#define QLORA_UNDER_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define QLORA_UNDER_ASAN 1
#endif
#endif
#ifndef QLORA_UNDER_ASAN
#define QLORA_UNDER_ASAN 0
#endif

#include <ftw.h>
#include <gtest/gtest.h>
#include <malloc.h>
#if QLORA_UNDER_ASAN
#include <sanitizer/allocator_interface.h>
#endif
#include <torch/torch.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <set>

#include "qlora/export/gguf_model.h"
#include "qlora/io/gguf.h"
#include "qlora/io/gguf_writer.h"
#include "qlora/io/safetensors.h"
#include "qlora/models/gguf_qk_permutation.h"
#include "qlora/models/llama.h"
#include "qlora/models/loader.h"
#include "qlora/models/qnat.h"
#include "qlora/nn/apply_lora.h"
#include "qlora/nn/ggml_linear.h"
#include "qlora/nn/qlora_linear.h"
#include "qlora/nn/recompute_tape.h"
#include "test_utils.h"
#include "tiny_llama.h"

namespace qlora::models {
namespace {

using qlora::test::expect_error;

LlamaConfig tiny_config() { return qlora::test::tiny_llama_config(); }

LlamaForCausalLM tiny_model(const LlamaConfig& c = tiny_config(), uint64_t seed = 0) {
  torch::manual_seed(seed);
  LlamaForCausalLM m(c);
  m->eval();
  return m;
}

at::Tensor random_ids(int64_t B, int64_t T, int64_t vocab, uint64_t seed = 1) {
  torch::manual_seed(seed);
  return torch::randint(0, vocab, {B, T}, torch::kLong);
}

double max_diff(const at::Tensor& a, const at::Tensor& b) {
  return (a - b).abs().max().item<double>();
}

// POSIX, not std::filesystem (broken symbols in the torch wheel).
void remove_tree(const std::string& path) {
  ::nftw(
      path.c_str(),
      [](const char* p, const struct stat*, int, struct FTW*) { return std::remove(p); }, 16,
      FTW_DEPTH | FTW_PHYS);
}

class TempDir {
 public:
  TempDir() {
    std::string pattern = ::testing::TempDir() + "qlora_llama_XXXXXX";
    EXPECT_NE(::mkdtemp(pattern.data()), nullptr) << std::strerror(errno);
    path = pattern;
  }
  ~TempDir() { remove_tree(path); }
  std::string path;
};

void write_text(const std::string& path, const std::string& text) { std::ofstream(path) << text; }

// A Hugging Face folder (config.json + model.safetensors) for `m`; tied
// models leave lm_head.weight out, as transformers does.
std::map<std::string, at::Tensor> save_hf(LlamaForCausalLMImpl& m, const std::string& dir) {
  write_text(dir + "/config.json", m.config().to_json());
  std::map<std::string, at::Tensor> tensors;
  for (const auto& p : m.named_parameters())
    if (!(m.config().tie_word_embeddings && p.key() == "lm_head.weight"))
      tensors[p.key()] = p.value().detach();
  io::save_safetensors(dir + "/model.safetensors", tensors);
  return tensors;
}

// ---- Layout --------------------------------------------------------------------

TEST(Llama, ModuleNamesMatchTransformers) {
  auto m = tiny_model();
  std::set<std::string> names;
  for (const auto& item : m->named_modules()) names.insert(item.key());
  for (const char* n :
       {"model", "model.embed_tokens", "model.layers", "model.layers.0", "model.layers.1.self_attn",
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
        "model.layers.0.self_attn.v_proj", "model.layers.0.self_attn.o_proj",
        "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj",
        "model.layers.1.mlp.down_proj", "model.layers.0.input_layernorm",
        "model.layers.0.post_attention_layernorm", "model.norm", "lm_head"})
    EXPECT_TRUE(names.count(n)) << n;
  const auto params = m->named_parameters();
  EXPECT_TRUE(params.contains("model.layers.0.self_attn.q_proj.weight"));
  EXPECT_EQ(params["model.layers.0.self_attn.k_proj.weight"].sizes(),
            at::IntArrayRef({2 * 8, 32}));  // GQA: kv_heads * head_dim rows
  EXPECT_FALSE(params.contains("model.layers.0.self_attn.q_proj.bias"));
}

TEST(Llama, ForwardShapesAndDtype) {
  auto m = tiny_model();
  const at::Tensor logits = m->forward(random_ids(3, 7, 64));
  EXPECT_EQ(logits.sizes(), at::IntArrayRef({3, 7, 64}));
  EXPECT_EQ(logits.scalar_type(), at::kFloat);
  EXPECT_TRUE(logits.isfinite().all().item<bool>());
  // bfloat16 parameters: logits still float32.
  m->to(at::kBFloat16);
  EXPECT_EQ(m->forward(random_ids(1, 5, 64)).scalar_type(), at::kFloat);
}

TEST(Llama, BiasesFollowModelType) {
  LlamaConfig c = tiny_config();
  c.model_type = "qwen2";
  auto params = tiny_model(c)->named_parameters();
  EXPECT_TRUE(params.contains("model.layers.0.self_attn.q_proj.bias"));
  EXPECT_TRUE(params.contains("model.layers.0.self_attn.v_proj.bias"));
  EXPECT_FALSE(params.contains("model.layers.0.self_attn.o_proj.bias"));
  EXPECT_FALSE(params.contains("model.layers.0.mlp.up_proj.bias"));
  c.model_type = "llama";
  c.attention_bias = c.mlp_bias = true;
  params = tiny_model(c)->named_parameters();
  EXPECT_TRUE(params.contains("model.layers.0.self_attn.o_proj.bias"));
  EXPECT_TRUE(params.contains("model.layers.0.mlp.down_proj.bias"));
}

TEST(Llama, TiedEmbeddingsShareOneTensor) {
  LlamaConfig c = tiny_config();
  c.tie_word_embeddings = true;
  auto m = tiny_model(c);
  const auto params = m->named_parameters();
  const at::Tensor embed = params["model.embed_tokens.weight"];
  EXPECT_TRUE(params["lm_head.weight"].is_same(embed));
  m->forward(random_ids(1, 4, 64)).sum().backward();
  EXPECT_TRUE(embed.grad().defined());
  EXPECT_TRUE(params["lm_head.weight"].grad().is_same(embed.grad()));
}

// ---- Masking -------------------------------------------------------------------

TEST(Llama, FutureTokensDoNotChangePastLogits) {
  auto m = tiny_model();
  at::Tensor a = random_ids(2, 12, 64);
  at::Tensor b = a.clone();
  b.narrow(1, 8, 4).copy_(random_ids(2, 4, 64, 7));
  const at::Tensor la = m->forward(a), lb = m->forward(b);
  EXPECT_LT(max_diff(la.narrow(1, 0, 8), lb.narrow(1, 0, 8)), 1e-6);
  EXPECT_GT(max_diff(la.narrow(1, 8, 4), lb.narrow(1, 8, 4)), 1e-3);
}

TEST(Llama, LeftPaddingMatchesUnpaddedRows) {
  auto m = tiny_model();
  const at::Tensor x = random_ids(1, 6, 64);
  at::Tensor ids = at::zeros({1, 9}, at::kLong);
  ids.narrow(1, 3, 6).copy_(x);
  at::Tensor mask = at::ones({1, 9}, at::kLong);
  mask.narrow(1, 0, 3).zero_();
  const at::Tensor positions = (mask.cumsum(-1) - 1).clamp_min(0);
  const at::Tensor padded = m->forward(ids, mask, positions);
  EXPECT_LT(max_diff(padded.narrow(1, 3, 6), m->forward(x)), 1e-5);
  EXPECT_TRUE(padded.isfinite().all().item<bool>());  // padding rows never NaN
}

TEST(Llama, MaskedKeysAreIgnored) {
  auto m = tiny_model();
  at::Tensor ids = random_ids(1, 8, 64);
  at::Tensor mask = at::ones({1, 8}, at::kLong);
  mask[0][2] = 0;  // hide one token
  at::Tensor changed = ids.clone();
  changed[0][2] = (ids[0][2].item<int64_t>() + 1) % 64;
  const at::Tensor a = m->forward(ids, mask), b = m->forward(changed, mask);
  EXPECT_LT(max_diff(a.narrow(1, 3, 5), b.narrow(1, 3, 5)), 1e-6);
}

TEST(Llama, PackedSegmentsAttendOnlyWithinThemselves) {
  auto m = tiny_model();
  const at::Tensor a = random_ids(1, 5, 64, 3), b = random_ids(1, 4, 64, 4);
  const at::Tensor packed = at::cat({a, b}, 1);
  const at::Tensor seg = at::tensor({0, 0, 0, 0, 0, 1, 1, 1, 1}, at::kLong).unsqueeze(0);
  const at::Tensor out = m->forward(packed, std::nullopt, std::nullopt, nullptr, seg);
  EXPECT_LT(max_diff(out.narrow(1, 0, 5), m->forward(a)), 1e-5);
  EXPECT_LT(max_diff(out.narrow(1, 5, 4), m->forward(b)), 1e-5);
  // Without segments the second sequence would see the first.
  EXPECT_GT(max_diff(m->forward(packed).narrow(1, 5, 4), m->forward(b)), 1e-3);
}

// ---- KV cache and generation ---------------------------------------------------

TEST(Llama, CachedDecodingEqualsFullRecomputation) {
  auto m = tiny_model();
  const at::Tensor ids = random_ids(2, 10, 64);
  const at::Tensor full = m->forward(ids);
  KVCache cache;
  at::NoGradGuard no_grad;
  const at::Tensor prefix = m->forward(ids.narrow(1, 0, 6), std::nullopt, std::nullopt, &cache);
  EXPECT_EQ(cache.length, 6);
  std::vector<at::Tensor> steps{prefix};
  steps.push_back(m->forward(ids.narrow(1, 6, 3), std::nullopt, std::nullopt, &cache));  // T > 1
  steps.push_back(m->forward(ids.narrow(1, 9, 1), std::nullopt, std::nullopt, &cache));
  EXPECT_LT(max_diff(at::cat(steps, 1), full), 1e-5);
}

TEST(Llama, GreedyGenerationEqualsArgmaxOfFullForward) {
  auto m = tiny_model();
  const at::Tensor prompt = random_ids(2, 5, 64);
  GenerationConfig g;
  g.max_new_tokens = 8;
  const at::Tensor out = m->generate(prompt, g);
  ASSERT_EQ(out.sizes(), at::IntArrayRef({2, 13}));
  EXPECT_TRUE(out.narrow(1, 0, 5).equal(prompt));
  at::NoGradGuard no_grad;
  for (int64_t t = 5; t < 13; ++t) {
    const at::Tensor next = m->forward(out.narrow(1, 0, t)).select(1, t - 1).argmax(-1);
    EXPECT_TRUE(next.equal(out.select(1, t))) << "step " << t;
  }
}

TEST(Llama, LeftPaddedBatchGeneratesLikeSingleRows) {
  auto m = tiny_model();
  const at::Tensor a = random_ids(1, 6, 64, 11), b = random_ids(1, 3, 64, 12);
  GenerationConfig g;
  g.max_new_tokens = 6;
  at::Tensor ids = at::zeros({2, 6}, at::kLong), mask = at::zeros({2, 6}, at::kLong);
  ids[0].copy_(a[0]);
  mask[0].fill_(1);
  ids[1].narrow(0, 3, 3).copy_(b[0]);
  mask[1].narrow(0, 3, 3).fill_(1);
  const at::Tensor batch = m->generate(ids, g, mask);
  EXPECT_TRUE(batch[0].narrow(0, 6, 6).equal(m->generate(a, g)[0].narrow(0, 6, 6)));
  EXPECT_TRUE(batch[1].narrow(0, 6, 6).equal(m->generate(b, g)[0].narrow(0, 3, 6)));
}

TEST(Llama, StopTokensEndRowsAndPad) {
  auto m = tiny_model();
  const at::Tensor prompt = random_ids(1, 4, 64);
  GenerationConfig g;
  g.max_new_tokens = 6;
  const at::Tensor free_run = m->generate(prompt, g);
  const int64_t first = free_run[0][4].item<int64_t>();
  g.stop_token_ids = std::vector<int64_t>{first};
  const at::Tensor stopped = m->generate(prompt, g);
  EXPECT_EQ(stopped.size(1), 5);  // the stop token is emitted, then the batch is done
  EXPECT_EQ(stopped[0][4].item<int64_t>(), first);
}

TEST(Llama, SamplingIsSeededAndTopKOneIsGreedy) {
  auto m = tiny_model();
  const at::Tensor prompt = random_ids(2, 4, 64);
  GenerationConfig g;
  g.max_new_tokens = 10;
  g.temperature = 1.0;
  g.top_p = 0.9;
  g.seed = 5;
  EXPECT_TRUE(m->generate(prompt, g).equal(m->generate(prompt, g)));
  g.top_k = 1;
  GenerationConfig greedy;
  greedy.max_new_tokens = 10;
  EXPECT_TRUE(m->generate(prompt, g).equal(m->generate(prompt, greedy)));
  g.top_p = 0;
  expect_error([&] { m->generate(prompt, g); }, "top_p must be in (0, 1]");
}

// ---- GQA ----------------------------------------------------------------------

// A grouped-query model equals the multi-head model whose K/V heads are the
// GQA ones repeated for each query head of their group.
TEST(Llama, GroupedQueryAttentionEqualsRepeatedHeads) {
  LlamaConfig gqa_cfg = tiny_config();
  auto gqa = tiny_model(gqa_cfg);
  LlamaConfig mha_cfg = gqa_cfg;
  mha_cfg.num_key_value_heads = gqa_cfg.num_attention_heads;
  auto mha = tiny_model(mha_cfg, 9);
  const int64_t D = gqa_cfg.attention_head_dim(), H = gqa_cfg.hidden_size;
  const int64_t n_rep = gqa_cfg.num_attention_heads / gqa_cfg.num_key_value_heads;
  at::NoGradGuard no_grad;
  auto src = gqa->named_parameters();
  for (auto& p : mha->named_parameters()) {
    at::Tensor w = src[p.key()];
    if (p.key().find("k_proj") != std::string::npos || p.key().find("v_proj") != std::string::npos)
      w = w.view({-1, D, H}).repeat_interleave(n_rep, 0).reshape({-1, H});
    p.value().copy_(w);
  }
  const at::Tensor ids = random_ids(2, 9, 64);
  EXPECT_LT(max_diff(gqa->forward(ids), mha->forward(ids)), 1e-5);
}

// ---- Gradient checkpointing ------------------------------------------------------

struct GradRun {
  std::map<std::string, at::Tensor> grads;
  at::Tensor loss;
  int64_t retained_bytes = 0;  // heap growth between before forward and after it
};

// Bytes the allocator has handed out: glibc's count, or AddressSanitizer's
// when it replaces malloc (mallinfo2 then reports zeros).
int64_t heap_in_use() {
#if QLORA_UNDER_ASAN
  return static_cast<int64_t>(__sanitizer_get_current_allocated_bytes());
#else
  const struct mallinfo2 mi = ::mallinfo2();
  return static_cast<int64_t>(mi.uordblks + mi.hblkhd);
#endif
}

GradRun train_step(LlamaForCausalLMImpl& m, const at::Tensor& ids, bool checkpoint,
                   bool keep_frozen_matmuls = false) {
  m.set_gradient_checkpointing(checkpoint, keep_frozen_matmuls);
  m.zero_grad();
  torch::manual_seed(123);  // the same dropout masks in both runs
  GradRun run;
  const int64_t before = heap_in_use();
  const at::Tensor logits = m.forward(ids);
  run.loss = torch::nn::functional::cross_entropy(
      logits.narrow(1, 0, ids.size(1) - 1).reshape({-1, logits.size(-1)}),
      ids.narrow(1, 1, ids.size(1) - 1).reshape({-1}));
  run.retained_bytes = heap_in_use() - before;
  run.loss.backward();
  for (const auto& p : m.named_parameters())
    if (p.value().grad().defined()) run.grads[p.key()] = p.value().grad().clone();
  return run;
}

void expect_same_grads(const GradRun& a, const GradRun& b) {
  EXPECT_TRUE(a.loss.equal(b.loss));
  ASSERT_EQ(a.grads.size(), b.grads.size());
  for (const auto& [name, g] : a.grads) {
    ASSERT_TRUE(b.grads.count(name)) << name;
    EXPECT_TRUE(g.equal(b.grads.at(name)))
        << name << " max |diff| " << max_diff(g, b.grads.at(name));
  }
}

TEST(Llama, GradientCheckpointingGivesIdenticalGradients) {
  LlamaConfig c = tiny_config();
  c.hidden_size = 128;
  c.intermediate_size = 256;
  c.num_hidden_layers = 4;
  c.vocab_size = 256;
  c.attention_dropout = 0.1;  // the recomputation must replay the dropout masks
  auto m = tiny_model(c);
  m->train();
  const at::Tensor ids = random_ids(4, 128, c.vocab_size);
  const GradRun plain = train_step(*m, ids, false);
  const GradRun ckpt = train_step(*m, ids, true);
  EXPECT_EQ(plain.grads.size(), m->parameters().size());
  expect_same_grads(plain, ckpt);
  std::cout << "[ activation memory ] full fine-tune, 4 layers, B=4 T=128 H=128: kept "
            << plain.retained_bytes / 1024 << " KiB without checkpointing, "
            << ckpt.retained_bytes / 1024 << " KiB with (saved "
            << (plain.retained_bytes - ckpt.retained_bytes) / 1024 << " KiB)\n";
  EXPECT_LT(ckpt.retained_bytes, plain.retained_bytes / 2);
}

// All-linear r = 4 adapters with dropout (4-bit bases with `base`), in
// training mode, B non-zero so every adapter has a gradient path to A.
nn::LoRAReport add_training_adapters(LlamaForCausalLMImpl& m,
                                     const std::optional<nn::QuantizedBaseConfig>& base = {}) {
  nn::LoRAConfig lora;
  lora.r = 4;
  lora.dropout = 0.2;
  lora.target_modules = {"all-linear"};
  nn::LoRAReport report = nn::apply_lora(m, lora, base);
  m.train();
  at::NoGradGuard no_grad;
  for (auto& p : m.named_parameters())
    if (p.key().find("lora_B") != std::string::npos) p.value().normal_(0, 0.1);
  return report;
}

TEST(Llama, GradientCheckpointingWithFrozenBaseAndLoRADropout) {
  LlamaConfig c = tiny_config();
  c.num_hidden_layers = 3;
  auto m = tiny_model(c);
  const nn::LoRAReport report = add_training_adapters(*m);
  EXPECT_EQ(report.replaced.size(), 7u * 3u);
  const at::Tensor ids = random_ids(2, 16, c.vocab_size);
  const GradRun plain = train_step(*m, ids, false);
  const GradRun ckpt = train_step(*m, ids, true);
  // Only adapters train; the embeddings feeding layer 0 do not require grad.
  EXPECT_EQ(plain.grads.size(), 2u * 7u * 3u);
  expect_same_grads(plain, ckpt);
}

// QLoRA layers (4-bit bases, dropout, a biased projection) under selective
// recomputation: the replayed frozen matmuls give the gradients of a full
// recomputation and of no checkpointing, and the tape holds what it should.
TEST(Llama, SelectiveRecomputationGivesIdenticalGradients) {
  LlamaConfig c = tiny_config();
  c.num_hidden_layers = 3;
  c.model_type = "qwen2";  // q/k/v biases: the replayed output includes the bias
  auto m = tiny_model(c);
  add_training_adapters(*m, nn::QuantizedBaseConfig{QuantConfig{64, "nf4", true}});
  const at::Tensor ids = random_ids(2, 16, c.vocab_size);
  const GradRun plain = train_step(*m, ids, false);
  const GradRun full = train_step(*m, ids, true);
  const GradRun selective = train_step(*m, ids, true, true);
  EXPECT_EQ(plain.grads.size(), 2u * 7u * 3u);
  expect_same_grads(full, selective);
  for (const auto& [name, g] : plain.grads)
    EXPECT_LT(max_diff(g, selective.grads.at(name)), 1e-6) << name;
  EXPECT_TRUE(m->model->keeps_frozen_matmuls());
  // Selective keeps more than full recomputation, far less than none.
  EXPECT_GT(selective.retained_bytes, full.retained_bytes);
  EXPECT_LT(selective.retained_bytes, plain.retained_bytes);
}

TEST(Llama, RecomputeTapeRejectsADifferentRetrace) {
  nn::RecomputeTape tape;
  tape.record(torch::zeros({2, 3}));
  expect_error(
      [&] {
        tape.replay({2, 4});
      },
      "has shape [2, 3] but the recomputation expects [2, 4]");
  EXPECT_EQ(tape.replay({2, 3}).sizes(), (std::vector<int64_t>{2, 3}));
  EXPECT_TRUE(tape.fully_replayed());
  expect_error([&] { tape.replay({2, 3}); }, "more 4-bit matmuls than the 1");
}

// ---- apply_lora on the model ------------------------------------------------------

TEST(Llama, ApplyLoraReplacesSlotsInPlace) {
  auto m = tiny_model();
  const at::Tensor ids = random_ids(1, 6, 64);
  const at::Tensor before = m->forward(ids);
  nn::LoRAConfig lora;
  lora.target_modules = {"q_proj", "v_proj", "lm_head"};
  const nn::LoRAReport r = nn::apply_lora(*m, lora);
  EXPECT_EQ(r.replaced,
            (std::vector<std::string>{
                "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "lm_head"}));
  EXPECT_LT(max_diff(m->forward(ids), before), 1e-6);  // B = 0: no change
}

// ---- Config ---------------------------------------------------------------------

const char* kMinimalJson = R"({"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
  "num_hidden_layers": 2, "num_attention_heads": 4)";

std::string json_with(const std::string& extra) {
  return std::string(kMinimalJson) + (extra.empty() ? "" : ", " + extra) + "}";
}

TEST(LlamaConfig, ParsesTransformers5AndLegacyRope) {
  LlamaConfig c = LlamaConfig::from_json(
      json_with(R"("num_key_value_heads": 2, "rope_parameters": {"rope_type": "llama3",
      "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 64}, "eos_token_id": [2, 7], "dtype": "bfloat16",
      "pad_token_id": null)"),
      "test");
  EXPECT_EQ(c.num_key_value_heads, 2);
  EXPECT_EQ(c.attention_head_dim(), 8);
  EXPECT_EQ(c.rope_scaling.type, "llama3");
  EXPECT_EQ(c.rope_theta, 500000.0);
  EXPECT_EQ(c.rope_scaling.original_max_position_embeddings, 64);
  EXPECT_EQ(c.eos_token_ids, (std::vector<int64_t>{2, 7}));
  EXPECT_EQ(c.torch_dtype, at::kBFloat16);
  EXPECT_FALSE(c.pad_token_id.has_value());
  const LlamaConfig legacy = LlamaConfig::from_json(
      json_with(R"("rope_theta": 1000.0, "rope_scaling": {"type": "linear", "factor": 2.0},
      "torch_dtype": "float16")"),
      "test");
  EXPECT_EQ(legacy.rope_scaling.type, "linear");
  EXPECT_EQ(legacy.rope_theta, 1000.0);
  EXPECT_EQ(legacy.torch_dtype, at::kHalf);
  // Round trip through to_json.
  const LlamaConfig again = LlamaConfig::from_json(c.to_json(), "to_json");
  EXPECT_EQ(again.to_json(), c.to_json());
}

TEST(LlamaConfig, RopeInverseFrequencies) {
  LlamaConfig c = tiny_config();
  c.rope_theta = 10000;
  const at::Tensor base = c.rope_inv_freq();
  ASSERT_EQ(base.numel(), 4);
  EXPECT_FLOAT_EQ(base[0].item<float>(), 1.0f);
  EXPECT_NEAR(base[1].item<float>(), std::pow(10000.0, -2.0 / 8), 1e-7);
  c.rope_scaling.type = "linear";
  c.rope_scaling.factor = 4;
  EXPECT_TRUE(c.rope_inv_freq().equal(base / 4));
  // llama3 with original context 64: wavelengths 2*pi*10000^(i/4) are 6.3 (< 64/4:
  // kept), 62.8 (between: smoothed), 628 and 6283 (> 64: divided by the factor).
  c.rope_scaling = RopeScaling{"llama3", 8.0, 1.0, 4.0, 64};
  const at::Tensor l3 = c.rope_inv_freq();
  EXPECT_EQ(l3[0].item<float>(), base[0].item<float>());
  const double inv1 = base[1].item<double>(), smooth = (64 / (2 * M_PI / inv1) - 1) / 3;
  EXPECT_NEAR(l3[1].item<float>(), (1 - smooth) * inv1 / 8 + smooth * inv1, 1e-7);
  EXPECT_EQ(l3[2].item<float>(), base[2].item<float>() / 8);
  EXPECT_EQ(l3[3].item<float>(), base[3].item<float>() / 8);
}

TEST(LlamaConfig, ErrorsNameTheSourceAndKey) {
  expect_error([] { LlamaConfig::from_json("{", "cfg.json"); }, "cfg.json: invalid JSON");
  expect_error([] { LlamaConfig::from_json(R"({"vocab_size": 3})", "cfg.json"); },
               "cfg.json: missing required key \"hidden_size\"");
  expect_error([] { LlamaConfig::from_json(json_with(R"("num_key_value_heads": "2")"), "c"); },
               "c: \"num_key_value_heads\" must be an integer, got \"2\"");
  expect_error([] { LlamaConfig::from_json(json_with(R"("num_key_value_heads": 3)"), "c"); },
               "num_attention_heads (4) must be a multiple of num_key_value_heads (3)");
  expect_error(
      [] {
        LlamaConfig::from_json(json_with(R"("rope_scaling": {"type": "yarn", "factor": 2})"), "c");
      },
      "rope type \"yarn\" is not supported");
  expect_error(
      [] { LlamaConfig::from_json(json_with(R"("rope_scaling": {"type": "linear"})"), "c"); },
      "needs \"factor\"");
  expect_error([] { LlamaConfig::from_json(json_with(R"("hidden_act": "gelu")"), "c"); },
               "hidden_act \"gelu\" is not supported");
  expect_error([] { LlamaConfig::from_json(json_with(R"("model_type": "gpt2")"), "c"); },
               "model_type \"gpt2\"");
  expect_error([] { LlamaConfig::from_json_file("/nonexistent/config.json"); },
               "cannot open /nonexistent/config.json");
}

// ---- Loading ---------------------------------------------------------------------

TEST(LlamaLoader, RoundTripsAHuggingFaceFolder) {
  for (bool tied : {false, true}) {
    LlamaConfig c = tiny_config();
    c.tie_word_embeddings = tied;
    auto m = tiny_model(c);
    TempDir dir;
    save_hf(*m, dir.path);
    LoadReport report;
    auto loaded = load_llama(dir.path, {}, &report);
    EXPECT_EQ(report.format, "safetensors");
    EXPECT_FALSE(loaded->is_training());
    const at::Tensor ids = random_ids(2, 7, 64);
    EXPECT_TRUE(loaded->forward(ids).equal(m->forward(ids))) << "tied=" << tied;
    if (tied) {
      EXPECT_TRUE(loaded->named_parameters()["lm_head.weight"].is_same(
          loaded->named_parameters()["model.embed_tokens.weight"]));
    }
  }
}

TEST(LlamaLoader, ReadsShardedCheckpoints) {
  auto m = tiny_model();
  TempDir dir;
  auto tensors = save_hf(*m, dir.path);
  std::remove((dir.path + "/model.safetensors").c_str());
  std::map<std::string, at::Tensor> first, second;
  std::string weight_map;
  for (const auto& [name, t] : tensors) {
    const bool in_first = name.find("layers.1.") == std::string::npos;
    (in_first ? first : second)[name] = t;
    weight_map +=
        std::string(weight_map.empty() ? "" : ",") + "\"" + name + "\": \"" +
        (in_first ? "model-00001-of-00002.safetensors" : "model-00002-of-00002.safetensors") + "\"";
  }
  io::save_safetensors(dir.path + "/model-00001-of-00002.safetensors", first);
  io::save_safetensors(dir.path + "/model-00002-of-00002.safetensors", second);
  write_text(dir.path + "/model.safetensors.index.json",
             "{\"metadata\": {}, \"weight_map\": {" + weight_map + "}}");
  const at::Tensor ids = random_ids(1, 5, 64);
  EXPECT_TRUE(load_llama(dir.path)->forward(ids).equal(m->forward(ids)));
}

TEST(LlamaLoader, ErrorsNameTheFileAndTensor) {
  auto m = tiny_model();
  TempDir dir;
  auto tensors = save_hf(*m, dir.path);
  const std::string file = dir.path + "/model.safetensors";
  auto rewrite = [&](std::map<std::string, at::Tensor> t) { io::save_safetensors(file, t); };

  auto missing = tensors;
  missing.erase("model.layers.1.mlp.up_proj.weight");
  rewrite(missing);
  expect_error([&] { load_llama(dir.path); },
               file + ": missing tensor \"model.layers.1.mlp.up_proj.weight\"");

  auto extra = tensors;
  extra["model.layers.2.mlp.up_proj.weight"] = at::zeros({48, 32});
  rewrite(extra);
  expect_error([&] { load_llama(dir.path); },
               file + ": unexpected tensor \"model.layers.2.mlp.up_proj.weight\"");

  auto wrong = tensors;
  wrong["model.layers.0.self_attn.k_proj.weight"] = at::zeros({32, 32});
  rewrite(wrong);
  expect_error([&] { load_llama(dir.path); },
               file +
                   ": tensor \"model.layers.0.self_attn.k_proj.weight\" has shape [32, 32] "
                   "but " +
                   dir.path + "/config.json needs [16, 32]");

  rewrite(tensors);
  write_text(dir.path + "/config.json", json_with(R"("num_key_value_heads": 5)"));
  expect_error([&] { load_llama(dir.path); }, dir.path + "/config.json: ");
  expect_error([&] { load_llama(dir.path + "/nope"); }, "is neither a Hugging Face model folder");
}

// Streaming QLoRA while loading gives what loading dense and then calling
// apply_lora(quantize) gives: the same layers, report and logits.
TEST(LlamaLoader, QuantizingWhileLoadingEqualsApplyLora) {
  auto m = tiny_model();
  TempDir dir;
  save_hf(*m, dir.path);
  nn::LoRAConfig lora;
  lora.r = 4;
  lora.target_modules = {"q_proj",    "k_proj",  "v_proj",   "o_proj",
                         "gate_proj", "up_proj", "down_proj"};
  nn::QuantizedBaseConfig base;
  base.quant.double_quant = true;
  LoadOptions opts;
  opts.lora = lora;
  opts.quantize = base;
  LoadReport report;
  torch::manual_seed(42);  // adapter init
  auto streamed = load_llama(dir.path, opts, &report);
  auto dense = load_llama(dir.path);
  torch::manual_seed(42);
  const nn::LoRAReport expected = nn::apply_lora(*dense, lora, base);
  ASSERT_TRUE(report.lora.has_value());
  EXPECT_EQ(report.lora->replaced, expected.replaced);
  EXPECT_EQ(report.lora->trainable_parameters, expected.trainable_parameters);
  EXPECT_EQ(report.lora->total_parameters, expected.total_parameters);
  EXPECT_EQ(report.lora->memory_bytes, expected.memory_bytes);
  EXPECT_EQ(report.quantized.size(), 14u);
  EXPECT_TRUE(report.inert_adapters.empty());
  const at::Tensor ids = random_ids(2, 6, 64);
  EXPECT_TRUE(streamed->forward(ids).equal(dense->forward(ids)));
  std::cout << "[ qlora load ] " << *report.lora << "\n";
}

TEST(LlamaLoader, QuantizeWithoutLoraGivesFrozenFourBitLayers) {
  auto m = tiny_model();
  TempDir dir;
  save_hf(*m, dir.path);
  LoadOptions opts;
  opts.quantize = nn::QuantizedBaseConfig{};
  LoadReport report;
  auto q = load_llama(dir.path, opts, &report);
  EXPECT_EQ(report.quantized.size(), 14u);  // every Linear but lm_head
  EXPECT_EQ(report.inert_adapters, report.quantized);
  for (const auto& p : q->named_parameters())
    if (p.key().find("lora_") != std::string::npos) {
      EXPECT_FALSE(p.value().requires_grad()) << p.key();
    }
  const at::Tensor ids = random_ids(1, 6, 64);
  // 4-bit weights: close to the dense model, not equal.
  const double diff = max_diff(q->forward(ids), m->forward(ids));
  EXPECT_GT(diff, 0);
  EXPECT_LT(diff, 0.5);
}

// ---- GGUF bases kept in their ggml blocks (gguf-native) ------------------------

// A llama GGUF of `m` as llama.cpp's converter writes one (Q/K rows
// permuted), every matrix in `type`, norms in F32.
void save_gguf(LlamaForCausalLMImpl& m, const std::string& path, io::GgmlType type) {
  const LlamaConfig& c = m.config();
  io::GgufWriter w;
  w.add_string("general.architecture", "llama");
  w.add_u32("llama.block_count", static_cast<uint32_t>(c.num_hidden_layers));
  w.add_u32("llama.context_length", static_cast<uint32_t>(c.max_position_embeddings));
  w.add_u32("llama.embedding_length", static_cast<uint32_t>(c.hidden_size));
  w.add_u32("llama.feed_forward_length", static_cast<uint32_t>(c.intermediate_size));
  w.add_u32("llama.attention.head_count", static_cast<uint32_t>(c.num_attention_heads));
  w.add_u32("llama.attention.head_count_kv", static_cast<uint32_t>(c.num_key_value_heads));
  w.add_f32("llama.attention.layer_norm_rms_epsilon", static_cast<float>(c.rms_norm_eps));
  w.add_f32("llama.rope.freq_base", static_cast<float>(c.rope_theta));
  for (const auto& p : m.named_parameters()) {
    if (c.tie_word_embeddings && p.key() == "lm_head.weight") continue;
    at::Tensor t = p.value().detach();
    if (p.key().find("q_proj") != std::string::npos)
      t = apply_llama_qk_permutation(t, c.num_attention_heads);
    if (p.key().find("k_proj") != std::string::npos)
      t = apply_llama_qk_permutation(t, c.num_key_value_heads);
    w.add_tensor(gguf_tensor_name(p.key()), t, t.dim() == 2 ? type : io::GgmlType::F32);
  }
  w.write(path);
}

LlamaConfig gguf_friendly_config() {
  LlamaConfig c = tiny_config();
  c.intermediate_size = 64;  // rows of whole 32-element blocks
  return c;
}

// A tiny random model written as a `type` GGUF in `dir`, loaded back with
// its blocks kept and LoRA r on `targets` (none: no adapters).
LlamaForCausalLM load_native(const TempDir& dir, io::GgmlType type,
                             const std::vector<std::string>& targets, int64_t r = 2,
                             LoadReport* report = nullptr) {
  auto m = tiny_model(gguf_friendly_config());
  const std::string path = dir.path + "/tiny.gguf";
  save_gguf(*m, path, type);
  LoadOptions opts;
  opts.gguf_native = LoadOptions::GgufNativeBase{};
  if (!targets.empty()) {
    nn::LoRAConfig lora;
    lora.r = r;
    lora.target_modules = targets;
    opts.lora = lora;
  }
  return load_llama(path, opts, report);
}

void randomise_lora_b(LlamaForCausalLMImpl& model) {
  at::NoGradGuard no_grad;
  for (auto& p : model.named_parameters())
    if (p.key().find("lora_B") != std::string::npos) p.value().normal_(0, 0.1);
}

TEST(LlamaLoader, GgufNativeBasesComputeTheDequantisedModel) {
  for (const auto type : {io::GgmlType::Q4_0, io::GgmlType::Q8_0}) {
    auto m = tiny_model(gguf_friendly_config());
    TempDir dir;
    const std::string path = dir.path + "/tiny.gguf";
    save_gguf(*m, path, type);
    LoadOptions opts;
    opts.gguf_native = LoadOptions::GgufNativeBase{};
    LoadReport report;
    auto native = load_llama(path, opts, &report);
    auto dense = load_llama(path);
    EXPECT_EQ(report.quantized.size(), 14u);  // every Linear but lm_head
    EXPECT_EQ(report.inert_adapters, report.quantized);
    auto layer = std::dynamic_pointer_cast<nn::GgmlLoRALinearImpl>(
        native->named_modules()["model.layers.1.self_attn.q_proj"]);
    ASSERT_TRUE(layer) << "q_proj is not a GgmlLoRALinear";
    EXPECT_EQ(layer->ggml_type(), io::ggml_type_name(type));
    // The very bytes of the file, rows put back in Hugging Face order.
    const io::GgufReader reader = io::GgufReader::open(path);
    EXPECT_TRUE(layer->blocks().equal(reverse_llama_qk_permutation(
        reader.raw("blk.1.attn_q.weight"), tiny_config().num_attention_heads)));
    EXPECT_TRUE(layer->base_weight(at::kFloat)
                    .equal(dense->named_parameters()["model.layers.1.self_attn.q_proj.weight"]));
    const at::Tensor ids = random_ids(2, 7, 64);
    EXPECT_LT(max_diff(native->forward(ids), dense->forward(ids)), 1e-5);
  }
}

TEST(LlamaLoader, GgufNativeLoraTrainsAndMergesIntoTheBlocks) {
  TempDir dir;
  LoadReport report;
  auto model = load_native(dir, io::GgmlType::Q4_0, {"q_proj", "v_proj", "down_proj"}, 4, &report);
  ASSERT_TRUE(report.lora.has_value());
  EXPECT_EQ(report.lora->replaced.size(), 6u);
  EXPECT_EQ(report.inert_adapters.size(), 8u);
  model->train();
  const at::Tensor ids = random_ids(2, 9, 64);
  const at::Tensor loss = model->forward(ids).logsumexp(-1).mean();
  loss.backward();
  int64_t with_grad = 0;
  for (const auto& p : model->named_parameters()) {
    if (!p.value().requires_grad()) continue;
    EXPECT_NE(p.key().find("lora_"), std::string::npos) << p.key() << " trains";
    if (p.value().grad().defined() && p.value().grad().abs().sum().item<double>() > 0) ++with_grad;
  }
  EXPECT_EQ(with_grad, 6);  // lora_B of each target (lora_A's is zero while B is zero)
  // merged_weight folds the adapter into the dequantised blocks.
  auto layer = std::dynamic_pointer_cast<nn::GgmlLoRALinearImpl>(
      model->named_modules()["model.layers.0.mlp.down_proj"]);
  ASSERT_TRUE(layer);
  {
    at::NoGradGuard no_grad;
    layer->lora_B.normal_();
  }
  const at::Tensor expected =
      layer->base_weight(at::kFloat) + layer->scaling() * layer->lora_B.matmul(layer->lora_A);
  EXPECT_LT(max_diff(layer->merged_weight(at::kFloat), expected.detach()), 1e-6);
}

TEST(LlamaLoader, GgufNativeModelsRoundTripThroughQnat) {
  TempDir dir;
  auto model = load_native(dir, io::GgmlType::Q4_0, {"q_proj", "up_proj"});
  randomise_lora_b(*model);
  save_qnat(dir.path + "/m.qnat", *model);
  auto back = load_qnat(dir.path + "/m.qnat");
  for (const char* name : {"model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"}) {
    auto a = std::dynamic_pointer_cast<nn::GgmlLoRALinearImpl>(model->named_modules()[name]);
    auto b = std::dynamic_pointer_cast<nn::GgmlLoRALinearImpl>(back->named_modules()[name]);
    ASSERT_TRUE(a && b) << name;
    EXPECT_EQ(b->ggml_type(), "Q4_0");
    EXPECT_TRUE(a->blocks().equal(b->blocks())) << name;
  }
  const at::Tensor ids = random_ids(2, 7, 64);
  EXPECT_TRUE(back->forward(ids).equal(model->forward(ids)));
}

TEST(LlamaLoader, GgufNativeNeedsAGgufFile) {
  auto m = tiny_model();
  TempDir dir;
  save_hf(*m, dir.path);
  LoadOptions opts;
  opts.gguf_native = LoadOptions::GgufNativeBase{};
  expect_error([&] { load_llama(dir.path, opts); },
               "is not a GGUF file: keeping ggml blocks (gguf-native bases) needs one");
}

TEST(Llama, SelectiveRecomputationReplaysGgmlMatmuls) {
  TempDir dir;
  torch::manual_seed(5);
  auto model = load_native(dir, io::GgmlType::Q8_0, {"all-linear"});
  randomise_lora_b(*model);
  const at::Tensor ids = random_ids(2, 12, 64);
  const GradRun plain = train_step(*model, ids, false);
  const GradRun selective = train_step(*model, ids, true, true);
  EXPECT_TRUE(model->model->keeps_frozen_matmuls());
  ASSERT_EQ(plain.grads.size(), selective.grads.size());
  for (const auto& [name, g] : plain.grads)
    EXPECT_LT(max_diff(g, selective.grads.at(name)), 1e-6) << name;
}

// A bitsandbytes-style folder written from our own quantiser: the packed
// weights load without requantisation (same bytes) and compute what the
// dequantised weights compute.
TEST(LlamaLoader, LoadsBitsandbytesFourBitFolders) {
  auto m = tiny_model();
  TempDir dir;
  auto tensors = save_hf(*m, dir.path);
  std::map<std::string, at::Tensor> out, dequantized = tensors;
  for (const auto& [name, t] : tensors) {
    const bool linear = name.find("_proj.weight") != std::string::npos;
    if (!linear) {
      out[name] = t;
      continue;
    }
    auto [packed, state] = quantize_4bit(t, QuantConfig{64, "nf4", true, at::kByte});
    for (const auto& [k, v] : state.to_state_dict(name, packed)) out[k] = v;
    dequantized[name] = dequantize_4bit(packed, state).to(at::kFloat);
  }
  io::save_safetensors(dir.path + "/model.safetensors", out);
  std::string config = m->config().to_json();
  config.insert(config.rfind('}'), R"(, "quantization_config": {"quant_method": "bitsandbytes",
    "load_in_4bit": true, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": true,
    "bnb_4bit_compute_dtype": "float32"})");
  write_text(dir.path + "/config.json", config);
  LoadReport report;
  auto q = load_llama(dir.path, {}, &report);
  EXPECT_EQ(report.format, "bnb-4bit");
  EXPECT_EQ(report.quantized.size(), 14u);
  const auto modules = q->named_modules();
  auto layer =
      std::dynamic_pointer_cast<nn::QLoRALinearImpl>(modules["model.layers.1.mlp.down_proj"]);
  ASSERT_TRUE(layer);
  EXPECT_TRUE(layer->packed_weight().equal(out["model.layers.1.mlp.down_proj.weight"]));
  EXPECT_TRUE(layer->quant_state().nested.has_value());
  // The reference: a dense model holding the dequantised weights.
  TempDir ref_dir;
  write_text(ref_dir.path + "/config.json", m->config().to_json());
  io::save_safetensors(ref_dir.path + "/model.safetensors", dequantized);
  const at::Tensor ids = random_ids(2, 6, 64);
  EXPECT_LT(max_diff(q->forward(ids), load_llama(ref_dir.path)->forward(ids)), 1e-5);
}

}  // namespace
}  // namespace qlora::models
