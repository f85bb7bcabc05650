// Seed-based dropout (nn::hash_dropout): the statistics of its mask, the
// mask regenerated in backward, reproducibility under a restored generator.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>

#include "common/dropout_hash.h"
#include "cpu/dropout_kernel.h"
#include "qlora/nn/hash_dropout.h"
#include "test_utils.h"

namespace {

using qlora::nn::hash_dropout;

TEST(HashDropout, KeepsOneMinusPOfTheElementsScaled) {
  torch::manual_seed(0);
  const int64_t n = 1 << 20;
  const at::Tensor x = torch::rand({n}) + 0.5;  // never 0: a 0 in the output means dropped
  for (double p : {0.05, 0.3, 0.5}) {
    const at::Tensor y = hash_dropout(x, p);
    const at::Tensor kept = y.ne(0);
    const double frac = kept.to(at::kDouble).mean().item<double>();
    const double sigma = std::sqrt(p * (1 - p) / n);
    EXPECT_NEAR(frac, 1 - p, 5 * sigma) << p;
    const float scale = static_cast<float>(1.0 / (1.0 - p));
    EXPECT_TRUE(y.masked_select(kept).equal(x.masked_select(kept) * scale)) << p;
    // Neighbouring elements are independent: P(both kept) = (1 - p)^2.
    const double both =
        (kept.narrow(0, 0, n - 1) & kept.narrow(0, 1, n - 1)).to(at::kDouble).mean().item<double>();
    EXPECT_NEAR(both, (1 - p) * (1 - p), 6 * sigma) << p;
  }
  EXPECT_TRUE(hash_dropout(x, 0.0).equal(x));
}

TEST(HashDropout, BackwardRegeneratesTheForwardMask) {
  torch::manual_seed(1);
  const at::Tensor x = (torch::rand({37, 129}) + 0.5).requires_grad_(true);
  const at::Tensor g = torch::randn({37, 129});
  const at::Tensor y = hash_dropout(x, 0.25);
  (y * g).sum().backward();
  const at::Tensor expected = y.detach().ne(0).to(at::kFloat) * g * (1.0f / 0.75f);
  EXPECT_TRUE(at::allclose(x.grad(), expected, 0, 1e-6));
}

TEST(HashDropout, SameGeneratorStateSameMaskNewDrawNewMask) {
  const at::Tensor x = torch::ones({4096});
  torch::manual_seed(7);
  const at::Tensor a = hash_dropout(x, 0.5);
  const at::Tensor b = hash_dropout(x, 0.5);
  torch::manual_seed(7);
  EXPECT_TRUE(hash_dropout(x, 0.5).equal(a));
  const double differ = a.ne(b).to(at::kDouble).mean().item<double>();
  EXPECT_NEAR(differ, 0.5, 0.05);  // independent masks disagree half the time at p = 0.5
}

TEST(HashDropout, KernelAcrossTheIndexLowWordWrap) {
  const auto key = qlora::detail::dropout_key(0x0123456789abcdefULL, 0.5);
  const int64_t n = 200, i0 = (int64_t{1} << 32) - 100;
  std::vector<float> in(n, 1.0f), out(n);
  qlora::cpu::dropout_apply(in.data(), out.data(), n, i0, key);
  int kept = 0;
  for (int64_t i = 0; i < n; ++i) {
    const bool keeps = qlora::detail::dropout_keeps(key, static_cast<uint64_t>(i0 + i));
    EXPECT_EQ(out[i], keeps ? 2.0f : 0.0f) << i;
    kept += keeps;
  }
  EXPECT_GT(kept, 60);
  EXPECT_LT(kept, 140);
}

TEST(HashDropout, OtherDtypesFallBackAndBadPIsAnError) {
  const at::Tensor x = torch::ones({1000}, torch::kDouble);
  const at::Tensor y = hash_dropout(x, 0.5);
  EXPECT_EQ(y.scalar_type(), at::kDouble);
  EXPECT_GT(y.eq(0).sum().item<int64_t>(), 300);
  qlora::test::expect_error([&] { hash_dropout(x, 1.0); }, "p must be in [0, 1)");
}

}  // namespace
