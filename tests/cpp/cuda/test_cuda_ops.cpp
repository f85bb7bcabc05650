// The CUDA kernels against the CPU kernels (which the conformance suite
// checks against bitsandbytes). Skipped, not faked, without a GPU.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "qlora/code_tables.h"
#include "qlora/ops.h"
#include "qlora/optim/paged_adamw.h"
#include "qlora/quant_state.h"
#include "test_utils.h"

namespace {

class CudaOps : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  }
};

TEST_F(CudaOps, QuantizeAndDequantize4bitMatchCpuBitForBit) {
  torch::manual_seed(0);
  for (auto dtype : {at::kFloat, at::kHalf, at::kBFloat16}) {
    for (const char* type : {"nf4", "fp4"}) {
      for (int64_t bs : {32, 64, 128, 256, 512, 1024, 2048, 4096}) {
        at::Tensor x = (torch::randn({5 * 4096 + 77}) * 2).to(dtype);
        x.slice(0, 0, bs).zero_();  // an all-zero block
        auto [pc, ac] = qlora::quantize_4bit(x, bs, type);
        auto [pg, ag] = qlora::quantize_4bit(x.cuda(), bs, type);
        ASSERT_TRUE(at::equal(pg.cpu(), pc)) << dtype << " " << type << " bs=" << bs;
        ASSERT_TRUE(at::equal(ag.cpu(), ac)) << dtype << " " << type << " bs=" << bs;
        for (auto out : {at::kFloat, at::kHalf, at::kBFloat16}) {
          const at::Tensor yc = qlora::dequantize_4bit(pc, ac, bs, type, x.sizes(), out);
          const at::Tensor yg = qlora::dequantize_4bit(pg, ag, bs, type, x.sizes(), out);
          ASSERT_TRUE(at::equal(yg.cpu(), yc)) << dtype << " " << type << " bs=" << bs;
        }
      }
    }
  }
}

TEST_F(CudaOps, HashDropoutDropsTheSameElementsAsTheCpu) {
  torch::manual_seed(0);
  const at::Tensor x = torch::randn({3, 100003});
  const at::Tensor yc = qlora::hash_dropout(x, 0.3, 12345);
  ASSERT_TRUE(at::equal(qlora::hash_dropout(x.cuda(), 0.3, 12345).cpu(), yc));
  for (auto dtype : {at::kHalf, at::kBFloat16}) {
    const at::Tensor yg = qlora::hash_dropout(x.to(dtype).cuda(), 0.3, 12345).cpu();
    EXPECT_TRUE(at::equal(yg == 0, yc == 0)) << dtype;
  }
  const at::Tensor xg = x.cuda().requires_grad_();
  qlora::hash_dropout(xg, 0.3, 12345).sum().backward();
  EXPECT_TRUE(at::equal(xg.grad().cpu() == 0, yc == 0));
}

TEST_F(CudaOps, Blockwise8MatchesCpu) {
  torch::manual_seed(1);
  const at::Tensor code = qlora::dynamic_map(true);
  const at::Tensor x = torch::randn({100003});
  for (int64_t bs : {64, 256, 4096}) {
    auto [qc, ac] = qlora::quantize_blockwise(x, code, bs);
    auto [qg, ag] = qlora::quantize_blockwise(x.cuda(), code.cuda(), bs);
    EXPECT_TRUE(at::equal(qg.cpu(), qc));
    EXPECT_TRUE(at::equal(ag.cpu(), ac));
    EXPECT_TRUE(at::equal(qlora::dequantize_blockwise(qg, ag, code.cuda(), bs, at::kFloat).cpu(),
                          qlora::dequantize_blockwise(qc, ac, code, bs, at::kFloat)));
  }
}

TEST_F(CudaOps, NonFiniteInputIsAnError) {
  at::Tensor x = torch::randn({256}).cuda();
  x[130] = std::numeric_limits<float>::infinity();
  qlora::test::expect_error([&] { qlora::quantize_4bit(x, 64, "nf4"); }, "inf or NaN in block 2");
}

TEST_F(CudaOps, GemvAndMatmulMatchCpu) {
  torch::manual_seed(2);
  const at::Tensor w = torch::randn({300, 4096}) * 0.02;
  auto [packed, absmax] = qlora::quantize_4bit(w, 64, "nf4");
  const at::Tensor bias = torch::randn({300});
  for (auto dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
    for (int64_t rows : {1, 9}) {
      const at::Tensor x = torch::randn({rows, 4096}).to(dtype);
      const at::Tensor yc =
          qlora::matmul_4bit(x, packed, absmax, 64, "nf4", {300, 4096}, bias.to(dtype));
      const at::Tensor xg = x.cuda().requires_grad_();
      const at::Tensor yg = qlora::matmul_4bit(xg, packed.cuda(), absmax.cuda(), 64, "nf4",
                                               {300, 4096}, bias.to(dtype).cuda());
      const double tol = dtype == at::kFloat ? 1e-3 : 5e-2;
      EXPECT_TRUE(at::allclose(yg.cpu().to(at::kFloat), yc.to(at::kFloat), tol, tol))
          << dtype << " rows=" << rows;
      yg.sum().backward();
      EXPECT_EQ(xg.grad().sizes(), x.sizes());
    }
  }
}

}  // namespace

namespace {

// Random ggml blocks of every kept type with finite f16 scales below 2^-7
// (bytes at `halves`), so 16-bit outputs stay finite.
at::Tensor random_ggml_blocks(int64_t rows, int64_t row_bytes, int64_t type_size,
                              std::initializer_list<int64_t> halves) {
  at::Tensor b = torch::randint(0, 256, {rows * row_bytes / type_size, type_size}, at::kByte);
  for (int64_t at_byte : halves) {
    const at::Tensor bits = torch::randint(0, 0x2000, {b.size(0)}, at::kShort);
    b.narrow(1, at_byte, 2).copy_(bits.view(at::kByte).view({-1, 2}));
  }
  return b.view({rows, row_bytes});
}

}  // namespace

TEST_F(CudaOps, GgmlDequantizeAndMatmulMatchCpu) {
  torch::manual_seed(3);
  struct Type {
    const char* name;
    int64_t block_size, type_size;
    std::initializer_list<int64_t> halves;
  };
  const Type types[] = {{"Q4_0", 32, 18, {0}},      {"Q4_1", 32, 20, {0, 2}},
                        {"Q5_0", 32, 22, {0}},      {"Q5_1", 32, 24, {0, 2}},
                        {"Q8_0", 32, 34, {0}},      {"Q4_K", 256, 144, {0, 2}},
                        {"Q5_K", 256, 176, {0, 2}}, {"Q6_K", 256, 210, {208}}};
  const int64_t N = 24, K = 512;
  for (const Type& t : types) {
    const at::Tensor blocks =
        random_ggml_blocks(N, K / t.block_size * t.type_size, t.type_size, t.halves);
    for (auto dtype : {at::kFloat, at::kHalf, at::kBFloat16}) {
      const at::Tensor wc = qlora::ggml_dequantize(blocks, t.name, {N, K}, dtype);
      const at::Tensor wg = qlora::ggml_dequantize(blocks.cuda(), t.name, {N, K}, dtype);
      ASSERT_TRUE(at::equal(wg.cpu(), wc)) << t.name << " " << dtype;
    }
    const at::Tensor x = torch::randn({7, K});
    const at::Tensor bias = torch::randn({N});
    const at::Tensor yc = qlora::ggml_matmul(x, blocks, t.name, {N, K}, bias);
    const at::Tensor xg = x.cuda().requires_grad_();
    const at::Tensor yg = qlora::ggml_matmul(xg, blocks.cuda(), t.name, {N, K}, bias.cuda());
    EXPECT_TRUE(at::allclose(yg.cpu(), yc, 1e-4, 1e-3)) << t.name;
    yg.sum().backward();
    const at::Tensor w = qlora::ggml_dequantize(blocks, t.name, {N, K}, at::kFloat);
    EXPECT_TRUE(at::allclose(xg.grad().cpu(), torch::ones({7, N}).matmul(w), 1e-4, 1e-3)) << t.name;
  }
}

// Double-quantised statistics decoded inside the CUDA dequantisation equal
// the CPU's separate pass; outputs and gradients as the CPU's.
TEST_F(CudaOps, Gemm4bitWithNestedStatisticsMatchesCpu) {
  torch::manual_seed(4);
  const at::Tensor w = torch::randn({96, 1024}) * 0.03;
  auto [packed, state] = qlora::quantize_4bit(w, qlora::QuantConfig{64, "nf4", true});
  ASSERT_TRUE(state.nested.has_value());
  const at::Tensor offset = at::scalar_tensor(state.nested->offset, at::kFloat);
  const qlora::NestedAbsmax cpu{state.absmax, state.nested->absmax, state.nested->code, offset};
  const qlora::NestedAbsmax gpu{state.absmax.cuda(), state.nested->absmax.cuda(),
                                state.nested->code.cuda(), offset.cuda()};
  for (auto dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
    for (int64_t rows : {1, 17}) {
      const at::Tensor x = torch::randn({rows, 1024}).to(dtype);
      const at::Tensor bias = torch::randn({96}).to(dtype);
      const at::Tensor yc = qlora::gemm_4bit(x, packed, {96, 1024}, cpu, 64, "nf4", bias);
      const at::Tensor xg = x.cuda().requires_grad_();
      const at::Tensor yg =
          qlora::gemm_4bit(xg, packed.cuda(), {96, 1024}, gpu, 64, "nf4", bias.cuda());
      const double tol = dtype == at::kFloat ? 1e-4 : 3e-2;
      EXPECT_TRUE(at::allclose(yg.cpu().to(at::kFloat), yc.to(at::kFloat), tol, tol))
          << dtype << " rows " << rows;
      yg.to(at::kFloat).sum().backward();
      const at::Tensor wd = qlora::dequantize_4bit(packed, state).to(at::kFloat);
      EXPECT_TRUE(at::allclose(xg.grad().cpu().to(at::kFloat), torch::ones({rows, 96}).matmul(wd),
                               tol, tol))
          << dtype;
    }
  }
}

TEST_F(CudaOps, OutOverloadsWriteWhatTheFunctionalOpsReturn) {
  torch::manual_seed(5);
  const at::Tensor code = qlora::dynamic_map(true).cuda();
  auto [q, absmax] = qlora::quantize_blockwise(torch::randn({5000}).cuda(), code, 256);
  at::Tensor out = torch::empty({5000}, torch::dtype(at::kBFloat16).device(torch::kCUDA));
  qlora::dequantize_blockwise_out(out, q, absmax, code, 256, at::kBFloat16);
  EXPECT_TRUE(at::equal(out, qlora::dequantize_blockwise(q, absmax, code, 256, at::kBFloat16)));
  auto [packed, a4] = qlora::quantize_4bit(torch::randn({64, 512}).cuda() * 0.02, 64, "nf4");
  const at::Tensor code4 = qlora::code_table_4bit("nf4").cuda();
  const at::Tensor x = torch::randn({1, 512}).cuda();
  at::Tensor y = torch::empty({1, 64}, x.options());
  qlora::gemv_4bit_out(y, x, packed, {64, 512}, a4, code4, 64);
  EXPECT_TRUE(at::equal(y, qlora::gemv_4bit(x, packed, {64, 512}, a4, code4, 64)));
}

// The fused optimizer kernels run the shared per-element math: CUDA equals
// the CPU bit for bit, 32- and 8-bit, with a partial block and a NaN.
TEST_F(CudaOps, FusedOptimizerUpdatesMatchCpuBitForBit) {
  torch::manual_seed(6);
  const int64_t n = 256 * 37 + 19;
  qlora::AdamStepArgs args;
  args.lr = 2e-3;
  args.weight_decay = 0.01;
  for (auto dtype : {at::kFloat, at::kBFloat16}) {
    at::Tensor pc = torch::randn({n}).to(dtype), pg = pc.cuda();
    at::Tensor mc = torch::zeros({n}), vc = torch::zeros({n});
    at::Tensor mg = mc.cuda(), vg = vc.cuda();
    at::Tensor map1 = qlora::dynamic_map(true), map2 = qlora::dynamic_map(false);
    at::Tensor map1g = map1.cuda(), map2g = map2.cuda();
    at::Tensor q1c = torch::full({n}, 127, at::kByte), q2c = torch::zeros({n}, at::kByte);
    at::Tensor a1c = torch::zeros({(n + 255) / 256}), a2c = torch::zeros({(n + 255) / 256});
    at::Tensor q1g = q1c.cuda(), q2g = q2c.cuda(), a1g = a1c.cuda(), a2g = a2c.cuda();
    at::Tensor p8c = pc.clone(), p8g = pg.clone();
    for (int64_t step = 1; step <= 5; ++step) {
      at::Tensor g = (torch::randn({n}) * 0.1).to(dtype);
      if (step == 3) g[100] = std::numeric_limits<float>::quiet_NaN();
      at::Tensor gg = g.cuda();
      args.step = step;
      qlora::optimizer_update_32bit(g, pc, mc, vc, args);
      qlora::optimizer_update_32bit(gg, pg, mg, vg, args);
      qlora::optimizer_update_8bit_blockwise(g, p8c, q1c, q2c, map1, map2, a1c, a2c, args);
      qlora::optimizer_update_8bit_blockwise(gg, p8g, q1g, q2g, map1g, map2g, a1g, a2g, args);
    }
    EXPECT_TRUE(at::equal(pg.cpu(), pc)) << dtype;
    EXPECT_TRUE(at::equal(mg.cpu(), mc) && at::equal(vg.cpu(), vc)) << dtype;
    EXPECT_TRUE(at::equal(p8g.cpu(), p8c)) << dtype;
    EXPECT_TRUE(at::equal(q1g.cpu(), q1c) && at::equal(q2g.cpu(), q2c)) << dtype;
    EXPECT_TRUE(at::equal(a1g.cpu(), a1c) && at::equal(a2g.cpu(), a2c)) << dtype;
  }
}

// Paged 8-bit AdamW on the GPU (states in managed memory, prefetched per
// update) equals the same optimizer on the CPU.
TEST_F(CudaOps, PagedAdamWOnTheGpuEqualsTheCpu) {
  for (int64_t bits : {32, 8}) {
    torch::manual_seed(7);
    at::Tensor wc = torch::randn({80, 300}).requires_grad_();
    at::Tensor wg = wc.detach().cuda().requires_grad_();
    const auto options =
        qlora::optim::PagedAdamWOptions(1e-3).optim_bits(bits).min_8bit_size(256).paged(true);
    qlora::optim::PagedAdamW oc({wc}, options), og({wg}, options);
    for (int s = 0; s < 10; ++s) {
      const at::Tensor g = torch::randn({80, 300});
      wc.mutable_grad() = g;
      wg.mutable_grad() = g.cuda();
      oc.step();
      og.step();
    }
    EXPECT_TRUE(at::equal(wg.detach().cpu(), wc.detach())) << bits;
  }
}
