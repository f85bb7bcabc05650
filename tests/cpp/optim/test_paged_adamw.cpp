// PagedAdamW against torch::optim::AdamW, paged vs in-memory, 8-bit states,
// non-finite gradients, and state save/load.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <sstream>

#include "qlora/optim/paged_adamw.h"

namespace {

using qlora::optim::PagedAdamW;
using qlora::optim::PagedAdamWOptions;
using qlora::optim::PagedAdamWParamState;

std::vector<at::Tensor> make_params(int64_t seed) {
  torch::manual_seed(seed);
  return {torch::randn({64, 96}).requires_grad_(), torch::randn({300}).requires_grad_(),
          torch::randn({7}).requires_grad_()};
}

// Deterministic gradients for step s.
void set_grads(std::vector<at::Tensor>& params, int64_t s) {
  torch::manual_seed(1000 + s);
  for (auto& p : params) p.mutable_grad() = torch::randn_like(p) * (1 + 0.1 * s);
}

template <typename Opt>
void run(Opt& opt, std::vector<at::Tensor>& params, int64_t from, int64_t to) {
  for (int64_t s = from; s < to; ++s) {
    set_grads(params, s);
    opt.step();
  }
}

bool all_equal(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b) {
  for (size_t i = 0; i < a.size(); ++i)
    if (!at::equal(a[i], b[i])) return false;
  return true;
}

// torch's AdamW rounds with or without FMAs depending on the CPU level ATen
// picks (add with alpha is an FMA on AVX2/AVX-512, not at the default
// level); ours rounds every operation on its own, everywhere.
TEST(PagedAdamW, ThirtyTwoBitTracksTorchAdamWToRounding) {
  auto ours = make_params(0), ref = make_params(0), start = make_params(0);
  PagedAdamW opt(ours, PagedAdamWOptions(3e-3).weight_decay(0.05).betas({0.8, 0.95}));
  torch::optim::AdamW adamw(ref,
                            torch::optim::AdamWOptions(3e-3).weight_decay(0.05).betas({0.8, 0.95}));
  run(opt, ours, 0, 60);
  run(adamw, ref, 0, 60);
  for (size_t i = 0; i < ours.size(); ++i) {
    EXPECT_GT((ref[i] - start[i]).abs().max().item<double>(), 0.02);
    EXPECT_LE((ours[i] - ref[i]).abs().max().item<double>(), 2e-6) << i;
  }
}

// The fused kernels against the chain of unfused ops: bit for bit, in
// 32-bit and 8-bit mode, with weight decay, a partial 8-bit block and
// non-finite gradient elements.
TEST(PagedAdamW, FusedKernelsEqualTheUnfusedOpsBitForBit) {
  for (int64_t bits : {32, 8}) {
    auto fused = make_params(5), unfused = make_params(5);
    const auto options =
        PagedAdamWOptions(2e-3).weight_decay(0.01).optim_bits(bits).min_8bit_size(256);
    PagedAdamW a(fused, options);
    PagedAdamW b(unfused, PagedAdamWOptions(options).fused(false));
    for (int64_t s = 0; s < 30; ++s) {
      for (auto* params : {&fused, &unfused}) {
        set_grads(*params, s);
        if (s == 7) {
          (*params)[0].mutable_grad()[3][3] = std::numeric_limits<float>::quiet_NaN();
          (*params)[1].mutable_grad()[299] = -std::numeric_limits<float>::infinity();
        }
      }
      a.step();
      b.step();
      ASSERT_TRUE(all_equal(fused, unfused)) << bits << "-bit, step " << s;
    }
    for (auto& p : fused) {
      const auto& sa = static_cast<PagedAdamWParamState&>(*a.state().at(p.unsafeGetTensorImpl()));
      const auto& sb = static_cast<PagedAdamWParamState&>(
          *b.state().at(unfused[&p - fused.data()].unsafeGetTensorImpl()));
      EXPECT_TRUE(at::equal(sa.exp_avg(), sb.exp_avg())) << bits;
      EXPECT_TRUE(at::equal(sa.exp_avg_sq(), sb.exp_avg_sq())) << bits;
      if (sa.is_8bit()) {
        EXPECT_TRUE(at::equal(sa.absmax1(), sb.absmax1()));
        EXPECT_TRUE(at::equal(sa.absmax2(), sb.absmax2()));
      }
      EXPECT_EQ(sa.skipped_elements(), sb.skipped_elements());
    }
  }
}

TEST(PagedAdamW, PagedToDiskEqualsInMemoryBitForBit) {
  for (int64_t bits : {32, 8}) {
    auto mem = make_params(1), paged = make_params(1);
    PagedAdamW a(mem, PagedAdamWOptions(1e-3).optim_bits(bits).min_8bit_size(256));
    PagedAdamW b(paged, PagedAdamWOptions(1e-3)
                            .optim_bits(bits)
                            .min_8bit_size(256)
                            .paged(true)
                            .resident_budget_bytes(0));
    run(a, mem, 0, 25);
    run(b, paged, 0, 25);
    EXPECT_TRUE(all_equal(mem, paged)) << bits << "-bit";
    EXPECT_EQ(a.state_bytes(), b.state_bytes());
  }
}

TEST(PagedAdamW, EightBitStatesAreBlockwiseAndTrackThirtyTwoBit) {
  auto p8 = make_params(2), p32 = make_params(2);
  PagedAdamW a(p8, PagedAdamWOptions(1e-3).optim_bits(8).min_8bit_size(4096));
  PagedAdamW b(p32, PagedAdamWOptions(1e-3));
  run(a, p8, 0, 40);
  run(b, p32, 0, 40);
  const auto& st = static_cast<PagedAdamWParamState&>(*a.state().at(p8[0].unsafeGetTensorImpl()));
  EXPECT_EQ(st.exp_avg().scalar_type(), at::kByte);
  EXPECT_EQ(st.absmax1().numel(), (64 * 96 + 255) / 256);
  const auto& small =
      static_cast<PagedAdamWParamState&>(*a.state().at(p8[1].unsafeGetTensorImpl()));
  EXPECT_EQ(small.exp_avg().scalar_type(), at::kFloat);  // 300 < min_8bit_size
  EXPECT_TRUE(at::equal(p8[1], p32[1]));
  // 40 steps of lr 1e-3 move weights by ~0.04; 8-bit moments keep them within a few %.
  const double moved = (p32[0] - make_params(2)[0]).abs().mean().item<double>();
  const double diff = (p8[0] - p32[0]).abs().mean().item<double>();
  EXPECT_LT(diff, 0.05 * moved) << "moved " << moved;
  EXPECT_LT(a.state_bytes(), b.state_bytes() / 2);
}

TEST(PagedAdamW, NonFiniteGradientElementsNeverCorruptState) {
  for (int64_t bits : {32, 8}) {
    auto params = make_params(3);
    PagedAdamW opt(params, PagedAdamWOptions(1e-2).optim_bits(bits).min_8bit_size(256));
    run(opt, params, 0, 3);
    const at::Tensor before = params[0].detach().clone();
    set_grads(params, 3);
    params[0].mutable_grad()[0][0] = std::numeric_limits<float>::quiet_NaN();
    params[0].mutable_grad()[1][5] = std::numeric_limits<float>::infinity();
    opt.step();
    EXPECT_TRUE(at::isfinite(params[0]).all().item<bool>());
    EXPECT_EQ(params[0][0][0].item<float>(), before[0][0].item<float>());
    EXPECT_EQ(params[0][1][5].item<float>(), before[1][5].item<float>());
    EXPECT_NE(params[0][0][1].item<float>(), before[0][1].item<float>());
    const auto& st =
        static_cast<PagedAdamWParamState&>(*opt.state().at(params[0].unsafeGetTensorImpl()));
    EXPECT_EQ(st.skipped_elements(), 2);
    run(opt, params, 4, 6);
    for (auto& p : params) EXPECT_TRUE(at::isfinite(p).all().item<bool>()) << bits;
  }
}

TEST(PagedAdamW, SaveLoadResumesExactly) {
  for (bool paged : {false, true}) {
    auto straight = make_params(4), resumed = make_params(4);
    const auto opts = PagedAdamWOptions(2e-3).optim_bits(8).min_8bit_size(256).paged(paged);
    PagedAdamW a(straight, opts);
    run(a, straight, 0, 20);

    PagedAdamW b(resumed, opts);
    run(b, resumed, 0, 10);
    std::stringstream buffer;
    {
      torch::serialize::OutputArchive out;
      b.save(out);
      out.save_to(buffer);
    }
    auto copy = resumed;
    for (auto& p : copy) p = p.detach().clone().requires_grad_();
    PagedAdamW c(copy, opts);
    torch::serialize::InputArchive in;
    in.load_from(buffer);
    c.load(in);
    run(c, copy, 10, 20);
    EXPECT_TRUE(all_equal(straight, copy)) << "paged=" << paged;
  }
}

TEST(PagedAdamW, BadOptionsAreRejected) {
  auto params = make_params(5);
  EXPECT_THROW(PagedAdamW(params, PagedAdamWOptions(1e-3).optim_bits(4)), c10::Error);
  EXPECT_THROW(PagedAdamW(params, PagedAdamWOptions(-1)), c10::Error);
  EXPECT_THROW(PagedAdamW(params, PagedAdamWOptions(1e-3).betas({1.0, 0.9})), c10::Error);
}

}  // namespace
