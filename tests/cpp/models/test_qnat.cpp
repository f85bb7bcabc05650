// QNAT (docs/QNAT.md): bit-exact round trips of QLoRA models, strict reading,
// and corrupted files (random byte flips and truncations) that must either
// load identical data or fail with a clear error, never crash. The
// corruption tests only need libqlora and gtest, so this file also builds
// standalone under AddressSanitizer (see the report / CMake notes).
#include "qlora/models/qnat.h"

#include <gtest/gtest.h>
#include <torch/torch.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <random>
#include <string>

#include "qlora/models/llama.h"
#include "qlora/nn/apply_lora.h"
#include "qlora/nn/lora_layer.h"
#include "qlora/nn/qlora_linear.h"
#include "test_utils.h"
#include "tiny_llama.h"

namespace qlora::io {
namespace {

using test::read_bytes;
using test::write_bytes;

using models::LlamaConfig;
using models::LlamaForCausalLM;
using models::load_qnat;
using models::QnatLoadOptions;
using models::QnatMetadata;
using models::save_qnat;
using qlora::test::expect_error;

LlamaConfig tiny_config() { return qlora::test::tiny_llama_config(); }

nn::LoRAConfig lora_config(bool dora = false) {
  nn::LoRAConfig l;
  l.r = 4;
  l.alpha = 8;
  l.target_modules = {"q_proj", "v_proj", "o_proj", "up_proj", "down_proj"};  // k, gate: dense
  l.use_dora = dora;
  return l;
}

const nn::QuantizedBaseConfig kNf4Double{{64, "nf4", true}, at::kFloat};

// A tiny random QLoRA model with a non-trivial adapter.
LlamaForCausalLM tiny_qlora(bool dora = false, uint64_t seed = 0,
                            const nn::QuantizedBaseConfig& base = kNf4Double) {
  torch::manual_seed(seed);
  LlamaForCausalLM m(tiny_config());
  nn::apply_lora(*m, lora_config(dora), base);
  at::NoGradGuard no_grad;
  for (auto& [name, layer] : nn::lora_layers(*m)) {
    layer->lora_B.normal_(0, 0.5);
    if (layer->lora_magnitude_vector.defined()) layer->lora_magnitude_vector.mul_(1.25);
  }
  m->eval();
  return m;
}

std::map<std::string, at::Tensor> state(LlamaForCausalLM& m) {
  std::map<std::string, at::Tensor> s;
  for (const auto& p : m->named_parameters(true)) s[p.key()] = p.value();
  for (const auto& b : m->named_buffers(true)) s[b.key()] = b.value();
  return s;
}

bool bit_equal(const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() != b.scalar_type() || a.sizes() != b.sizes()) return false;
  const at::Tensor x = a.contiguous(), y = b.contiguous();
  return std::memcmp(x.data_ptr(), y.data_ptr(), x.nbytes()) == 0;
}

// Every parameter and buffer bit-equal (and requires_grad the same); returns
// a description of the first difference, "" when none.
std::string diff(LlamaForCausalLM& a, LlamaForCausalLM& b) {
  auto sa = state(a), sb = state(b);
  if (sa.size() != sb.size())
    return "tensor count " + std::to_string(sa.size()) + " vs " + std::to_string(sb.size());
  for (const auto& [name, t] : sa) {
    const auto it = sb.find(name);
    if (it == sb.end()) return "missing " + name;
    if (!bit_equal(t, it->second)) return "differs: " + name;
    if (t.requires_grad() != it->second.requires_grad()) return "requires_grad differs: " + name;
  }
  // Quant-state scalars (not buffers).
  auto la = nn::lora_layers(*a), lb = nn::lora_layers(*b);
  if (la.size() != lb.size()) return "LoRA layer count";
  for (size_t i = 0; i < la.size(); ++i) {
    if (la[i].first != lb[i].first) return "LoRA layer names";
    auto qa = std::dynamic_pointer_cast<nn::QLoRALinearImpl>(la[i].second);
    auto qb = std::dynamic_pointer_cast<nn::QLoRALinearImpl>(lb[i].second);
    if (!qa != !qb) return "layer kind: " + la[i].first;
    const auto &ca = la[i].second->lora_config(), &cb = lb[i].second->lora_config();
    if (ca.r != cb.r || ca.alpha != cb.alpha || ca.use_dora != cb.use_dora)
      return "LoRA config: " + la[i].first;
    if (!qa) continue;
    const QuantState &x = qa->quant_state(), &y = qb->quant_state();
    if (x.shape != y.shape || x.blocksize != y.blocksize || x.quant_type != y.quant_type ||
        x.dtype != y.dtype || !x.nested != !y.nested || qa->compute_dtype() != qb->compute_dtype())
      return "quant state: " + la[i].first;
    if (x.nested && (std::memcmp(&x.nested->offset, &y.nested->offset, 4) != 0 ||
                     x.nested->blocksize != y.nested->blocksize))
      return "nested quant state: " + la[i].first;
  }
  return "";
}

at::Tensor logits(LlamaForCausalLM& m) {
  torch::manual_seed(7);
  const at::Tensor ids = torch::randint(0, 64, {2, 9}, torch::kLong);
  at::NoGradGuard no_grad;
  return m->forward(ids);
}

TEST(Qnat, ChecksumIsXxh64) {
  EXPECT_EQ(qnat_checksum("", 0), 0xEF46DB3751D8E999ULL);
  EXPECT_EQ(qnat_checksum("abc", 3), 0x44BC2CF5AD770999ULL);
  // Every length path (32-byte stripes, 8/4/1-byte tails) differs per byte.
  std::string s(100, 'x');
  for (size_t n = 0; n < s.size(); ++n) {
    const uint64_t h = qnat_checksum(s.data(), n);
    std::string t = s;
    if (n > 0) {
      t[n - 1] ^= 1;
      EXPECT_NE(h, qnat_checksum(t.data(), n)) << n;
    }
  }
}

TEST(Qnat, RoundTripIsBitExact) {
  for (bool dora : {false, true}) {
    SCOPED_TRACE(dora ? "DoRA" : "LoRA");
    test::TempDir dir;
    const std::string path = dir.path() + "/m.qnat";
    LlamaForCausalLM m = tiny_qlora(dora);
    QnatMetadata meta;
    meta.tokenizer_source = "tok/tokenizer.json";
    meta.tokenizer_kind = "hf-json";
    meta.lora = lora_config(dora);
    meta.quantization = kNf4Double;
    meta.extra_json = R"({"step": 12})";
    save_qnat(path, m, meta);

    QnatFile f = QnatFile::open(path);
    EXPECT_TRUE(f.has_adapter());
    EXPECT_EQ(f.version(), 1u);
    for (const auto& t : f.tensors()) EXPECT_EQ(t.offset % 64, 0u) << t.name;
    const QnatTensor& q = f.info("model.layers.0.self_attn.q_proj.weight");
    EXPECT_EQ(q.dtype, QnatDtype::kNF4);
    EXPECT_EQ(q.shape, (std::vector<int64_t>{32, 32}));
    EXPECT_EQ(q.nbytes, 512u);
    EXPECT_EQ(f.info("model.layers.0.self_attn.q_proj.weight_absmax").dtype, QnatDtype::kU8);
    EXPECT_EQ(f.info("model.layers.0.self_attn.k_proj.weight").dtype, QnatDtype::kF32);

    QnatMetadata back;
    LlamaForCausalLM l = load_qnat(path, {}, &back);
    EXPECT_EQ(diff(m, l), "");
    EXPECT_TRUE(torch::equal(logits(m), logits(l)));
    EXPECT_EQ(back.tokenizer_source, "tok/tokenizer.json");
    EXPECT_EQ(back.tokenizer_kind, "hf-json");
    ASSERT_TRUE(back.lora);
    EXPECT_EQ(back.lora->target_modules, lora_config().target_modules);
    ASSERT_TRUE(back.quantization);
    EXPECT_TRUE(back.quantization->quant.double_quant);
    EXPECT_EQ(back.extra_json, R"({"step":12})");

    // Copying (not zero-copy) loads the same; saving again gives the same bytes.
    QnatLoadOptions copy;
    copy.zero_copy = false;
    LlamaForCausalLM c = load_qnat(path, copy);
    EXPECT_EQ(diff(m, c), "");
    save_qnat(dir.path() + "/again.qnat", l, meta);
    EXPECT_EQ(read_bytes(path), read_bytes(dir.path() + "/again.qnat"));
    std::remove((dir.path() + "/again.qnat").c_str());
    std::remove(path.c_str());
  }
}

TEST(Qnat, Fp4WithoutDoubleQuantAndTiedEmbeddings) {
  test::TempDir dir;
  const std::string path = dir.path() + "/m.qnat";
  LlamaConfig c = tiny_config();
  c.tie_word_embeddings = true;
  torch::manual_seed(3);
  LlamaForCausalLM m(c);
  nn::apply_lora(*m, lora_config(), nn::QuantizedBaseConfig{{64, "fp4", false}, at::kFloat});
  save_qnat(path, m);
  QnatFile f = QnatFile::open(path);
  EXPECT_EQ(f.info("model.layers.1.mlp.up_proj.weight").dtype, QnatDtype::kFP4);
  EXPECT_FALSE(f.contains("lm_head.weight"));  // written once, as the embedding
  LlamaForCausalLM l = load_qnat(path);
  EXPECT_EQ(diff(m, l), "");
  EXPECT_TRUE(torch::equal(logits(m), logits(l)));
  EXPECT_EQ(l->lm_head.module()->as<torch::nn::LinearImpl>()->weight.data_ptr(),
            l->model->embed_tokens->weight.data_ptr());
  std::remove(path.c_str());
}

TEST(Qnat, WithoutAdapter) {
  test::TempDir dir;
  const std::string path = dir.path() + "/base.qnat";
  LlamaForCausalLM m = tiny_qlora();
  QnatMetadata meta;
  meta.include_adapter = false;
  save_qnat(path, m, meta);
  QnatFile f = QnatFile::open(path);
  EXPECT_FALSE(f.has_adapter());
  EXPECT_FALSE(f.contains("model.layers.0.self_attn.q_proj.lora_B"));
  LlamaForCausalLM l = load_qnat(path);
  // The bases equal, the adapter is a fresh no-op: the model computes m's base.
  {
    at::NoGradGuard no_grad;
    for (auto& [name, layer] : nn::lora_layers(*m)) layer->lora_B.zero_();
  }
  auto sm = state(m), sl = state(l);
  ASSERT_EQ(sm.size(), sl.size());
  for (const auto& [name, t] : sm) {
    if (name.find(".lora_A") != std::string::npos) continue;  // fresh random init
    EXPECT_TRUE(bit_equal(t, sl.at(name))) << name;
  }
  EXPECT_TRUE(torch::equal(logits(m), logits(l)));

  // A model with no LoRA layers at all (plain dense Linear everywhere).
  torch::manual_seed(5);
  LlamaForCausalLM dense(tiny_config());
  dense->eval();
  save_qnat(path, dense);
  EXPECT_FALSE(QnatFile::open(path).has_adapter());
  LlamaForCausalLM d = load_qnat(path);
  EXPECT_EQ(diff(dense, d), "");
  EXPECT_TRUE(torch::equal(logits(dense), logits(d)));
  std::remove(path.c_str());
}

// ---- errors ---------------------------------------------------------------------

class QnatErrors : public ::testing::Test {
 protected:
  void SetUp() override {
    path = dir.path() + "/m.qnat";
    bad = dir.path() + "/bad.qnat";
    model = tiny_qlora();
    save_qnat(path, model);
    bytes = read_bytes(path);
  }
  void TearDown() override {
    std::remove(path.c_str());
    std::remove(bad.c_str());
  }
  test::TempDir dir;
  std::string path, bad, bytes;
  LlamaForCausalLM model{nullptr};
};

TEST_F(QnatErrors, Header) {
  std::string b = bytes;
  b[0] = 'X';
  write_bytes(bad, b);
  expect_error([&] { QnatFile::open(bad); }, "QNAT file " + bad + ": not a QNAT file");

  b = bytes;
  b[4] = 2;
  write_bytes(bad, b);
  expect_error([&] { load_qnat(bad); }, "unsupported QNAT version 2");

  b = bytes;
  b[8] |= 2;
  write_bytes(bad, b);
  expect_error([&] { load_qnat(bad); }, "unknown flags 0x2");

  b = bytes;
  b[25] ^= 0x10;  // inside the metadata JSON
  write_bytes(bad, b);
  expect_error([&] { load_qnat(bad); }, "header checksum mismatch");

  write_bytes(bad, "");
  expect_error([&] { load_qnat(bad); }, "truncated");
  expect_error([&] { load_qnat(dir.path() + "/nope.qnat"); }, "nope.qnat");
}

TEST_F(QnatErrors, BadChecksumNamesTheTensor) {
  const QnatTensor t = QnatFile::open(path).info("model.layers.1.mlp.up_proj.weight");
  std::string b = bytes;
  b[t.offset + 3] ^= 0x01;
  write_bytes(bad, b);
  expect_error(
      [&] { load_qnat(bad); },
      "QNAT file " + bad + ": tensor \"model.layers.1.mlp.up_proj.weight\": checksum mismatch");
  // Lazily: open without verifying, then verify the tensor.
  QnatFile lazy = QnatFile::open(bad, /*verify_checksums=*/false);
  lazy.verify("model.layers.0.mlp.up_proj.weight");
  expect_error([&] { lazy.tensor("model.layers.1.mlp.up_proj.weight", true); },
               "checksum mismatch");
}

TEST_F(QnatErrors, Truncated) {
  write_bytes(bad, bytes.substr(0, bytes.size() - 1));
  expect_error([&] { load_qnat(bad); }, "run past the end of the file");
  write_bytes(bad, bytes.substr(0, 30));
  expect_error([&] { load_qnat(bad); }, "truncated");
}

// Random single-byte flips and truncations: never a crash; either the same
// model or an error naming the file.
TEST_F(QnatErrors, RandomCorruptionNeverCrashes) {
  std::mt19937_64 rng(12345);
  const std::map<std::string, at::Tensor> ref = state(model);
  int loaded = 0, failed = 0;
  auto attempt = [&](const std::string& b, const std::string& what) {
    write_bytes(bad, b);
    try {
      LlamaForCausalLM l = load_qnat(bad);
      EXPECT_EQ(diff(model, l), "") << what;
      ++loaded;
    } catch (const QnatError& e) {
      EXPECT_NE(std::string(e.what()).find("QNAT file " + bad), std::string::npos)
          << what << ": " << e.what();
      ++failed;
    }
  };
  for (int i = 0; i < 300; ++i) {
    std::string b = bytes;
    const size_t pos = rng() % b.size();
    b[pos] = static_cast<char>(b[pos] ^ (1u << (rng() % 8)));
    attempt(b, "flip at " + std::to_string(pos));
  }
  for (int i = 0; i < 100; ++i) {
    const size_t len = rng() % bytes.size();
    attempt(bytes.substr(0, len), "truncated to " + std::to_string(len));
  }
  // Flips in the zero padding before the first tensor load fine.
  QnatFile f = QnatFile::open(path);
  uint64_t first = bytes.size();
  for (const auto& t : f.tensors()) first = std::min(first, t.offset);
  std::string b = bytes;
  b[first - 1] ^= 0x40;
  attempt(b, "flip in padding");
  EXPECT_GT(loaded, 0);
  EXPECT_GT(failed, 300);
  std::cout << "corruption: " << loaded << " loaded identical, " << failed << " rejected\n";
}

// Flips inside the header, metadata and tensor table with the header checksum
// recomputed, so that every validation behind it is exercised: a crafted file
// may load a different model, but must never crash or escape as anything but
// a QnatError.
TEST_F(QnatErrors, CraftedHeadersNeverCrash) {
  auto u32 = [&](size_t at) {
    uint32_t v;
    std::memcpy(&v, bytes.data() + at, 4);
    return v;
  };
  auto u64 = [&](size_t at) {
    uint64_t v;
    std::memcpy(&v, bytes.data() + at, 8);
    return v;
  };
  size_t pos = 20 + u64(12);
  const uint64_t count = u64(pos);
  pos += 8;
  for (uint64_t i = 0; i < count; ++i) {
    pos += 4 + u32(pos);      // name
    pos += 4;                 // dtype
    pos += 4 + 8 * u32(pos);  // rank, shape
    pos += 24;                // offset, byte length, checksum
    pos += 4 + u32(pos);      // quant-state reference
  }
  const size_t header_end = pos;
  ASSERT_EQ(u64(header_end), qnat_checksum(bytes.data(), header_end));
  std::mt19937_64 rng(777);
  int loaded = 0, failed = 0;
  const size_t meta_end = 20 + u64(12);
  for (int i = 0; i < 400; ++i) {
    std::string b = bytes;
    // Half the flips in the table (offsets, lengths, shapes, names), half anywhere.
    const size_t at =
        i % 2 ? meta_end + rng() % (header_end - meta_end) : 12 + rng() % (header_end - 12);
    b[at] = static_cast<char>(b[at] ^ (1u << (rng() % 8)));
    const uint64_t sum = qnat_checksum(b.data(), header_end);
    std::memcpy(b.data() + header_end, &sum, 8);
    write_bytes(bad, b);
    try {
      LlamaForCausalLM l = load_qnat(bad);
      ++loaded;
    } catch (const QnatError& e) {
      EXPECT_NE(std::string(e.what()).find("QNAT file " + bad), std::string::npos) << e.what();
      ++failed;
    }
  }
  std::cout << "crafted headers: " << loaded << " loaded, " << failed << " rejected\n";
  EXPECT_GT(failed, 300);
}

}  // namespace
}  // namespace qlora::io
