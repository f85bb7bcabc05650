// gemv_4bit and the differentiable matmul_4bit on CPU.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "qlora/ops.h"
#include "qlora/quant_state.h"
#include "test_utils.h"

namespace {

using qlora::test::expect_error;

struct Weight {
  at::Tensor packed, absmax;
  std::vector<int64_t> shape;
  int64_t blocksize;
  std::string type;
  at::Tensor dense(at::ScalarType dtype) const {
    return qlora::dequantize_4bit(packed, absmax, blocksize, type, shape, dtype);
  }
};

Weight make_weight(int64_t out, int64_t in, int64_t blocksize = 64, const char* type = "nf4") {
  auto [packed, absmax] = qlora::quantize_4bit(torch::randn({out, in}) * 0.05, blocksize, type);
  return {packed, absmax, {out, in}, blocksize, type};
}

TEST(Gemv4bit, MatchesDequantizeThenMatmul) {
  torch::manual_seed(0);
  // Odd in_features make blocks straddle rows and bytes straddle rows.
  for (auto [out, in, bs] : std::vector<std::tuple<int64_t, int64_t, int64_t>>{
           {64, 128, 64}, {33, 77, 32}, {17, 4096, 4096}, {5, 3, 64}}) {
    for (const char* type : {"nf4", "fp4"}) {
      const Weight w = make_weight(out, in, bs, type);
      for (auto dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
        const at::Tensor x = torch::randn({1, in}).to(dtype);
        const at::Tensor code = qlora::code_table_4bit(type);
        const at::Tensor y = qlora::gemv_4bit(x, w.packed, w.shape, w.absmax, code, bs);
        ASSERT_EQ(y.sizes(), (at::IntArrayRef{1, out}));
        ASSERT_EQ(y.scalar_type(), dtype);
        const at::Tensor ref = at::matmul(x.to(at::kFloat), w.dense(dtype).to(at::kFloat).t());
        const double tol = dtype == at::kFloat ? 1e-5 : 2e-2;
        EXPECT_TRUE(at::allclose(y.to(at::kFloat), ref, tol, tol))
            << type << " " << dtype << " " << out << "x" << in
            << " max err=" << (y.to(at::kFloat) - ref).abs().max().item<float>();
      }
    }
  }
}

TEST(Matmul4bit, ForwardEqualsLinearOnTheDequantizedWeight) {
  torch::manual_seed(1);
  const Weight w = make_weight(48, 96);
  const at::Tensor bias = torch::randn({48});
  for (auto shape : std::vector<std::vector<int64_t>>{{96}, {1, 96}, {7, 96}, {2, 3, 96}}) {
    const at::Tensor x = torch::randn(shape);
    const at::Tensor y = qlora::matmul_4bit(x, w.packed, w.absmax, 64, "nf4", w.shape, bias);
    const at::Tensor ref = at::linear(x, w.dense(at::kFloat), bias);
    EXPECT_EQ(y.sizes(), ref.sizes());
    EXPECT_TRUE(at::allclose(y, ref, 1e-5, 1e-5)) << at::IntArrayRef(shape);
  }
}

TEST(Matmul4bit, GradientsFlowToInputAndBiasOnly) {
  torch::manual_seed(2);
  const Weight w = make_weight(32, 64);
  const at::Tensor x = torch::randn({4, 5, 64}, torch::requires_grad());
  const at::Tensor bias = torch::randn({32}, torch::requires_grad());
  const at::Tensor absmax = w.absmax.clone().requires_grad_(false);
  const at::Tensor y = qlora::matmul_4bit(x, w.packed, absmax, 64, "nf4", w.shape, bias);
  const at::Tensor g = torch::randn_like(y);
  y.backward(g);
  const at::Tensor W = w.dense(at::kFloat);
  EXPECT_TRUE(at::allclose(x.grad(), at::matmul(g, W), 1e-5, 1e-5));
  EXPECT_TRUE(at::allclose(bias.grad(), g.sum(at::IntArrayRef{0, 1}), 1e-5, 1e-5));
  EXPECT_FALSE(absmax.grad().defined());
}

TEST(Matmul4bit, NoBiasAndLowPrecisionBackward) {
  const Weight w = make_weight(16, 64);
  for (auto dtype : {at::kBFloat16, at::kHalf}) {
    const at::Tensor x = torch::randn({3, 64}).to(dtype).requires_grad_();
    const at::Tensor y = qlora::matmul_4bit(x, w.packed, w.absmax, 64, "nf4", w.shape);
    EXPECT_EQ(y.scalar_type(), dtype);
    y.sum().backward();
    EXPECT_EQ(x.grad().scalar_type(), dtype);
    EXPECT_TRUE(at::allclose(x.grad().to(at::kFloat),
                             w.dense(dtype).to(at::kFloat).sum(0).expand({3, 64}), 2e-2, 2e-2));
  }
}

TEST(Matmul4bit, Float64ForGradcheck) {
  const Weight w = make_weight(8, 64);
  const at::Tensor x = torch::randn({2, 64}, at::kDouble).requires_grad_();
  const at::Tensor bias = torch::randn({8}, at::kDouble).requires_grad_();
  const at::Tensor y = qlora::matmul_4bit(x, w.packed, w.absmax, 64, "nf4", w.shape, bias);
  EXPECT_EQ(y.scalar_type(), at::kDouble);
  EXPECT_TRUE(at::allclose(y, at::linear(x, w.dense(at::kFloat).to(at::kDouble), bias)));
}

TEST(Matmul4bit, QuantizersAreNotDifferentiable) {
  const at::Tensor x = torch::randn({64}, torch::requires_grad());
  auto [packed, absmax] = qlora::quantize_4bit(x, 64, "nf4");
  const at::Tensor y =
      qlora::dequantize_4bit(packed, absmax.detach().requires_grad_(), 64, "nf4", {64}, at::kFloat);
  expect_error([&] { y.sum().backward(); }, "dequantize_4bit");
}

TEST(Matmul4bit, BadInput) {
  const Weight w = make_weight(16, 64);
  expect_error(
      [&] {
        qlora::matmul_4bit(torch::randn({2, 63}), w.packed, w.absmax, 64, "nf4", w.shape);
      },
      "x's last dimension (63) must equal in_features shapeB[1] = 64");
  expect_error(
      [&] {
        qlora::matmul_4bit(torch::randn({2, 64}), w.packed, w.absmax, 64, "nf4", w.shape,
                           torch::randn({15}));
      },
      "bias must have shape [16]");
  expect_error(
      [&] {
        qlora::matmul_4bit(torch::randn({2, 64}), w.packed, w.absmax, 64, "nf4", {16, 32});
      },
      "B holds 512 bytes but shapeB [16, 32] needs 256");
}

}  // namespace
