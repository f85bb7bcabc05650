// The fused head + cross-entropy (nn::linear_cross_entropy_sum), the causal
// LM loss built on it (LlamaForCausalLM::summed_loss) and the oneDNN dense
// GEMM the CPU kernels use: each against the plain ATen computation.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "cpu/onednn_linear.h"
#include "ops/dense_linear.h"
#include "qlora/models/llama.h"
#include "qlora/nn/apply_lora.h"
#include "qlora/nn/linear_cross_entropy.h"
#include "reference_loss.h"
#include "test_utils.h"
#include "tiny_llama.h"

namespace {

using qlora::test::expect_error;

double max_diff(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kFloat) - b.to(at::kFloat)).abs().max().item<double>();
}

struct LossAndGrad {
  at::Tensor loss, grad;
};

LossAndGrad reference(const at::Tensor& hidden, const at::Tensor& weight,
                      const at::Tensor& labels) {
  const at::Tensor h = hidden.detach().clone().requires_grad_(true);
  const at::Tensor logits = at::linear(h, weight).to(at::kFloat);
  const at::Tensor loss = torch::nn::functional::cross_entropy(
      logits, labels, torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum));
  loss.backward();
  return {loss.detach(), h.grad()};
}

LossAndGrad fused(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
                  int64_t chunk_logits) {
  const at::Tensor h = hidden.detach().clone().requires_grad_(true);
  const at::Tensor loss = qlora::nn::linear_cross_entropy_sum(h, weight, labels, chunk_logits);
  (loss * 0.5).backward();  // a non-unit incoming gradient must scale the result
  return {loss.detach(), h.grad() * 2};
}

TEST(LinearCrossEntropy, EqualsCrossEntropyOfTheLogitsInEveryChunking) {
  torch::manual_seed(0);
  const int64_t R = 37, H = 24, V = 101;
  const at::Tensor hidden = torch::randn({R, H});
  const at::Tensor weight = torch::randn({V, H}) * 0.3;
  const at::Tensor labels = torch::randint(0, V, {R});
  const LossAndGrad ref = reference(hidden, weight, labels);
  // One chunk, uneven chunks (5 rows, last one 2), a row at a time.
  for (int64_t chunk : {int64_t{1} << 23, 5 * V, int64_t{1}}) {
    const LossAndGrad got = fused(hidden, weight, labels, chunk);
    EXPECT_NEAR(got.loss.item<double>(), ref.loss.item<double>(), 1e-4 * R) << chunk;
    EXPECT_LT(max_diff(got.grad, ref.grad), 1e-5) << chunk;
  }
  at::NoGradGuard no_grad;  // the forward-only path (evaluation)
  EXPECT_NEAR(qlora::nn::linear_cross_entropy_sum(hidden, weight, labels).item<double>(),
              ref.loss.item<double>(), 1e-4 * R);
}

TEST(LinearCrossEntropy, Bfloat16HeadMatchesItsOwnLogits) {
  torch::manual_seed(1);
  const at::Tensor hidden = torch::randn({16, 32}).to(at::kBFloat16);
  const at::Tensor weight = (torch::randn({300, 32}) * 0.2).to(at::kBFloat16);
  const at::Tensor labels = torch::randint(0, 300, {16});
  const LossAndGrad ref = reference(hidden, weight, labels);
  const LossAndGrad got = fused(hidden, weight, labels, 4 * 300);
  EXPECT_EQ(got.grad.scalar_type(), at::kBFloat16);
  EXPECT_NEAR(got.loss.item<double>(), ref.loss.item<double>(), 0.02 * 16);
  EXPECT_LT(max_diff(got.grad, ref.grad), 0.02);
}

TEST(LinearCrossEntropy, BadInputIsNamed) {
  const at::Tensor h = torch::randn({3, 4});
  const at::Tensor w = torch::randn({5, 4});
  expect_error(
      [&] {
        qlora::nn::linear_cross_entropy_sum(h, w, torch::tensor({0, 1, 5}));
      },
      "labels must lie in [0, 5)");
  expect_error(
      [&] {
        qlora::nn::linear_cross_entropy_sum(h, w, torch::tensor({0, -100, 1}));
      },
      "label != -100");
  expect_error(
      [&] {
        qlora::nn::linear_cross_entropy_sum(h, w, torch::tensor({0, 1}));
      },
      "labels must be int64 [3]");
  expect_error(
      [&] {
        qlora::nn::linear_cross_entropy_sum(h, w.clone().requires_grad_(true),
                                            torch::tensor({0, 1, 2}));
      },
      "must be frozen");
  expect_error(
      [&] {
        qlora::nn::linear_cross_entropy_sum(h, torch::randn({5, 3}), torch::tensor({0, 1, 2}));
      },
      "hidden must be [rows, H] and weight [V, H]");
}

// summed_loss (padding-free, labelled rows only, fused frozen head) against
// the padded forward's full logits and summed_causal_lm_loss: same loss,
// same LoRA gradients.
void expect_summed_loss_matches_logits(bool tied, std::vector<std::string> targets) {
  qlora::models::LlamaConfig c = qlora::test::tiny_llama_config();
  c.tie_word_embeddings = tied;
  torch::manual_seed(2);
  qlora::models::LlamaForCausalLM m(c);
  qlora::nn::LoRAConfig lora;
  lora.r = 4;
  lora.target_modules = std::move(targets);
  qlora::nn::apply_lora(*m, lora);
  {
    at::NoGradGuard no_grad;
    for (auto& p : m->named_parameters())
      if (p.key().find("lora_B") != std::string::npos) p.value().normal_(0, 0.1);
  }
  m->train();
  const at::Tensor ids = torch::randint(0, c.vocab_size, {3, 9});
  at::Tensor labels = ids.clone();
  labels.narrow(1, 0, 4).fill_(-100);  // prompt tokens
  labels[2].narrow(0, 6, 3).fill_(-100);
  at::Tensor mask = torch::ones({3, 9}, torch::kLong);
  mask[2].narrow(0, 6, 3).fill_(0);  // right padding
  mask[1].narrow(0, 0, 2).fill_(0);  // left padding (prompt labels are -100 already)

  std::vector<at::Tensor> params;
  for (const auto& p : m->parameters())
    if (p.requires_grad()) params.push_back(p);
  ASSERT_FALSE(params.empty());
  auto grads_of = [&](const at::Tensor& loss) {
    for (auto& p : params) p.mutable_grad() = at::Tensor();
    loss.backward();
    std::vector<at::Tensor> g;
    for (auto& p : params) g.push_back(p.grad().clone());
    return g;
  };
  const at::Tensor ref = qlora::test::summed_causal_lm_loss(m->forward(ids, mask), labels);
  const auto ref_grads = grads_of(ref);
  const at::Tensor got = m->summed_loss(ids, labels, mask);
  const auto got_grads = grads_of(got);
  EXPECT_NEAR(got.item<double>(), ref.item<double>(), 1e-4);
  ASSERT_EQ(got_grads.size(), ref_grads.size());
  for (size_t i = 0; i < ref_grads.size(); ++i)
    EXPECT_LT(max_diff(got_grads[i], ref_grads[i]), 1e-5) << "parameter " << i;
}

TEST(SummedLoss, TiedFrozenHeadEqualsFullLogits) {
  expect_summed_loss_matches_logits(true, {"all-linear"});
}
TEST(SummedLoss, UntiedFrozenHeadEqualsFullLogits) {
  expect_summed_loss_matches_logits(false, {"all-linear"});
}
TEST(SummedLoss, LoRAOnTheHeadEqualsFullLogits) {
  expect_summed_loss_matches_logits(false, {"q_proj", "down_proj", "lm_head"});
}

TEST(SummedLoss, NoLabelsGivesZero) {
  qlora::models::LlamaForCausalLM m(qlora::test::tiny_llama_config());
  const at::Tensor ids = torch::randint(0, 64, {2, 5});
  EXPECT_EQ(m->summed_loss(ids, torch::full({2, 5}, -100, torch::kLong)).item<double>(), 0.0);
  expect_error(
      [&] {
        m->summed_loss(ids, torch::zeros({2, 4}, torch::kLong));
      },
      "labels must be int64");
}

TEST(OneDnnLinear, EqualsAtenLinear) {
  torch::manual_seed(3);
  for (auto dtype : {at::kFloat, at::kBFloat16}) {
    const at::Tensor x = torch::randn({2, 7, 48}).to(dtype);
    const at::Tensor w = torch::randn({40, 48}).to(dtype);
    const at::Tensor ref = at::linear(x.to(at::kFloat), w.to(at::kFloat));
    const double tol = dtype == at::kFloat ? 1e-4 : 0.15;
    const at::Tensor y = qlora::detail::dense_linear(x, w);
    EXPECT_EQ(y.sizes(), ref.sizes());
    EXPECT_LT(max_diff(y, ref), tol) << dtype;
    // A weight read transposed in place (the backward's W^T).
    const at::Tensor wt = torch::randn({48, 40}).to(dtype);
    EXPECT_LT(max_diff(qlora::detail::dense_linear(x, wt.t()),
                       at::linear(x.to(at::kFloat), wt.t().to(at::kFloat))),
              tol)
        << dtype;
  }
  // Switched off, the same call is at::linear.
  qlora::cpu::set_onednn_enabled(false);
  const at::Tensor x = torch::randn({5, 8}), w = torch::randn({3, 8});
  EXPECT_TRUE(qlora::detail::dense_linear(x, w).equal(at::linear(x, w)));
  qlora::cpu::set_onednn_enabled(true);
}

}  // namespace
