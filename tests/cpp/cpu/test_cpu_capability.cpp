// The CPU capability levels (include/qlora/cpu_capability.h): every level the
// CPU has gives the portable path's results, bit for bit where the math is
// the same (quantize, dequantize, dropout), within float32 summation order
// where it is not (gemv, matmul, dense GEMMs).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdlib>
#include <limits>
#include <tuple>
#include <vector>

#include "cpu/isa_kernels.h"
#include "cpu/onednn_linear.h"
#include "ops/dense_linear.h"
#include "qlora/cpu_capability.h"
#include "qlora/nn/hash_dropout.h"
#include "qlora/nn/linear_cross_entropy.h"
#include "qlora/ops.h"

namespace {

using qlora::CpuCapability;

std::vector<CpuCapability> available_levels() {
  std::vector<CpuCapability> levels;
  for (int i = 0; i <= static_cast<int>(qlora::detected_cpu_capability()); ++i)
    levels.push_back(static_cast<CpuCapability>(i));
  return levels;
}

// Runs f at `level`, then restores the level in force before.
template <typename F>
auto at_level(CpuCapability level, F&& f) {
  const CpuCapability before = qlora::cpu_capability();
  qlora::set_cpu_capability(level);
  struct Restore {
    CpuCapability level;
    ~Restore() { qlora::set_cpu_capability(level); }
  } restore{before};
  return f();
}

double max_rel_diff(const at::Tensor& a, const at::Tensor& ref) {
  const at::Tensor r = ref.to(at::kDouble);
  return ((a.to(at::kDouble) - r).abs().max() / r.abs().max().clamp_min(1e-30)).item<double>();
}

// Random blocks plus the cases where rounding and codes are decided: all-zero
// blocks, tiny (subnormal-absmax) blocks, values exactly on NF4 bounds, -0.
at::Tensor adversarial_input(int64_t n, at::ScalarType dtype) {
  torch::manual_seed(11);
  at::Tensor x = torch::randn({n}) * 3;
  x.narrow(0, 0, 64).zero_();
  x.narrow(0, 64, 64).copy_(torch::randn({64}) * 1e-39f);  // subnormal products
  // Large blocks: beyond float16's range after decoding where the input allows it.
  x.narrow(0, 128, 64).copy_((torch::rand({64}) * 2 - 1) * (dtype == at::kHalf ? 6.5e4f : 1e5f));
  const float bounds[] = {-0.8480964004993439f, -0.1609302014112473f, 0.0f,
                          0.2461123019456863f,  0.6229856610298157f,  0.8614784181118011f};
  for (int i = 0; i < 64; ++i) x[192 + i] = bounds[i % 6];
  x[192] = 1.0f;  // absmax 1: the bounds stay exact after normalising
  x[255] = -0.0f;
  return x.to(dtype);
}

TEST(CpuCapability, NamesAndParsing) {
  for (CpuCapability level : {CpuCapability::kPortable, CpuCapability::kAvx2,
                              CpuCapability::kAvx512, CpuCapability::kAvx512Bf16})
    EXPECT_EQ(qlora::parse_cpu_capability(qlora::cpu_capability_name(level)), level);
  EXPECT_EQ(qlora::parse_cpu_capability("default"), CpuCapability::kPortable);
  EXPECT_FALSE(qlora::parse_cpu_capability("avx3").has_value());
  EXPECT_NE(qlora::cpu_capability_report().find("detected"), std::string::npos);
}

TEST(CpuCapability, CapIsClampedToTheDetectedLevel) {
  const CpuCapability before = qlora::cpu_capability();
  EXPECT_EQ(qlora::set_cpu_capability(CpuCapability::kAvx512Bf16),
            qlora::detected_cpu_capability());
  EXPECT_EQ(qlora::set_cpu_capability(CpuCapability::kPortable), CpuCapability::kPortable);
  EXPECT_STREQ(qlora::cpu::isa_kernels().name, "portable");
  // Asking for a table above the CPU's level gives the CPU's own.
  EXPECT_STREQ(qlora::cpu::isa_kernels(CpuCapability::kAvx512Bf16).name,
               qlora::cpu::isa_kernels(qlora::detected_cpu_capability()).name);
  qlora::set_cpu_capability(before);
}

// ctest runs this binary once per level with QLORA_CPU_CAPABILITY set: the
// variable must be what the kernels use.
TEST(CpuCapability, EnvironmentCapIsInForce) {
  const char* want = std::getenv("QLORA_REQUIRE_CPU_CAPABILITY");
  if (want == nullptr) GTEST_SKIP() << "not a per-level run";
  EXPECT_EQ(qlora::cpu_capability(), qlora::parse_cpu_capability(want));
}

TEST(CpuCapability, QuantizeAndDequantizeEqualPortableBitForBit) {
  for (auto dtype : {at::kFloat, at::kHalf, at::kBFloat16}) {
    const at::Tensor x = adversarial_input(3 * 4096 + 45, dtype);
    for (const char* type : {"nf4", "fp4"}) {
      for (int64_t bs : {32, 64, 256, 4096}) {
        // Named tensors, not a structured binding: clang 14 refuses those in lambdas.
        at::Tensor p0, a0;
        std::tie(p0, a0) =
            at_level(CpuCapability::kPortable, [&] { return qlora::quantize_4bit(x, bs, type); });
        for (CpuCapability level : available_levels()) {
          auto [p, a] = at_level(level, [&] { return qlora::quantize_4bit(x, bs, type); });
          EXPECT_TRUE(at::equal(p, p0))
              << qlora::cpu_capability_name(level) << " " << dtype << " " << type << " bs=" << bs;
          EXPECT_TRUE(at::equal(a, a0));
          for (auto out : {at::kFloat, at::kHalf, at::kBFloat16}) {
            const at::Tensor y0 = at_level(CpuCapability::kPortable, [&] {
              return qlora::dequantize_4bit(p0, a0, bs, type, x.sizes(), out);
            });
            const at::Tensor y = at_level(
                level, [&] { return qlora::dequantize_4bit(p0, a0, bs, type, x.sizes(), out); });
            // Bit patterns, so -0 vs +0 and NaN payloads count too.
            const auto bits = out == at::kFloat ? at::kInt : at::kShort;
            EXPECT_TRUE(at::equal(y.view(bits), y0.view(bits)))
                << qlora::cpu_capability_name(level) << " " << out << " " << type << " bs=" << bs;
            // ...and the portable path is torch's own rounding.
            EXPECT_TRUE(at::equal(
                y0, qlora::dequantize_4bit(p0, a0, bs, type, x.sizes(), at::kFloat).to(out)));
          }
        }
      }
    }
  }
}

TEST(CpuCapability, NonFiniteAbsmaxDecodesAsTorchRounds) {
  const at::Tensor x = torch::randn({256});
  at::Tensor packed, absmax;
  std::tie(packed, absmax) = qlora::quantize_4bit(x, 64, "nf4");
  absmax[1] = std::numeric_limits<float>::quiet_NaN();
  absmax[2] = std::numeric_limits<float>::infinity();
  const at::Tensor ref = qlora::dequantize_4bit(packed, absmax, 64, "nf4", {256}, at::kFloat);
  for (auto out : {at::kHalf, at::kBFloat16}) {
    const at::Tensor y0 = at_level(CpuCapability::kPortable, [&] {
      return qlora::dequantize_4bit(packed, absmax, 64, "nf4", {256}, out);
    });
    // NaN where torch's conversion gives NaN (payloads aside), its values elsewhere.
    const at::Tensor r = ref.to(out);
    EXPECT_TRUE(at::equal(y0.isnan(), r.isnan()));
    EXPECT_TRUE(at::equal(y0.nan_to_num(0), r.nan_to_num(0)));
    for (CpuCapability level : available_levels()) {
      const at::Tensor y = at_level(
          level, [&] { return qlora::dequantize_4bit(packed, absmax, 64, "nf4", {256}, out); });
      EXPECT_TRUE(at::equal(y.view(at::kShort), y0.view(at::kShort)))
          << qlora::cpu_capability_name(level);
    }
  }
}

TEST(CpuCapability, GemvAndMatmulMatchPortable) {
  torch::manual_seed(12);
  const int64_t N = 96, K = 320;  // K not a multiple of the blocksize: rows straddle blocks
  const at::Tensor w = torch::randn({N, K}) * 0.05;
  at::Tensor packed, absmax;
  std::tie(packed, absmax) = qlora::quantize_4bit(w, 64, "nf4");
  for (auto dtype : {at::kFloat, at::kHalf, at::kBFloat16}) {
    const double tol = dtype == at::kFloat ? 1e-5 : 1e-2;
    for (int64_t rows : {1, 7, 33}) {
      const at::Tensor x = torch::randn({rows, K}).to(dtype);
      const at::Tensor bias = torch::randn({N}).to(dtype);
      const at::Tensor ref = at_level(CpuCapability::kPortable, [&] {
        return qlora::matmul_4bit(x, packed, absmax, 64, "nf4", {N, K}, bias);
      });
      // The definition: x @ dequant(W).T + bias in float64.
      const at::Tensor exact = at::linear(
          x.to(at::kDouble),
          qlora::dequantize_4bit(packed, absmax, 64, "nf4", {N, K}, dtype).to(at::kDouble),
          bias.to(at::kDouble));
      EXPECT_LT(max_rel_diff(ref, exact), tol) << dtype << " rows=" << rows;
      for (CpuCapability level : available_levels()) {
        const at::Tensor y = at_level(level, [&] {
          return qlora::matmul_4bit(x, packed, absmax, 64, "nf4", {N, K}, bias);
        });
        EXPECT_EQ(y.scalar_type(), dtype);
        EXPECT_LT(max_rel_diff(y, exact), tol)
            << qlora::cpu_capability_name(level) << " " << dtype << " rows=" << rows;
      }
    }
  }
}

TEST(CpuCapability, MatmulBackwardInEveryDtypeAtEveryLevel) {
  torch::manual_seed(13);
  const int64_t N = 48, K = 128;
  const at::Tensor w = torch::randn({N, K}) * 0.05;
  at::Tensor packed, absmax;
  std::tie(packed, absmax) = qlora::quantize_4bit(w, 64, "nf4");
  for (auto dtype : {at::kFloat, at::kHalf, at::kBFloat16}) {
    const at::Tensor x0 = torch::randn({5, K}).to(dtype);
    const at::Tensor g = torch::randn({5, N}).to(dtype);
    const at::Tensor exact = at::matmul(
        g.to(at::kDouble),
        qlora::dequantize_4bit(packed, absmax, 64, "nf4", {N, K}, dtype).to(at::kDouble));
    for (CpuCapability level : available_levels()) {
      const at::Tensor gx = at_level(level, [&] {
        const at::Tensor x = x0.clone().requires_grad_();
        qlora::matmul_4bit(x, packed, absmax, 64, "nf4", {N, K}).backward(g);
        return x.grad();
      });
      EXPECT_EQ(gx.scalar_type(), dtype);
      EXPECT_LT(max_rel_diff(gx, exact), dtype == at::kFloat ? 1e-5 : 1e-2)
          << qlora::cpu_capability_name(level) << " " << dtype;
    }
  }
}

TEST(CpuCapability, DenseLinearInEveryDtypeAtEveryLevel) {
  torch::manual_seed(14);
  for (auto dtype : {at::kFloat, at::kHalf, at::kBFloat16}) {
    // Wide enough that the float32 route converts W in several tiles.
    const at::Tensor x = torch::randn({6, 1024}).to(dtype);
    const at::Tensor w = torch::randn({3000, 1024}).to(dtype);
    const at::Tensor exact = at::linear(x.to(at::kDouble), w.to(at::kDouble));
    const at::Tensor exact_t =
        at::linear(x.to(at::kDouble), w.narrow(0, 0, 1024).t().to(at::kDouble));
    for (CpuCapability level : available_levels()) {
      at_level(level, [&] {
        const double tol = dtype == at::kFloat ? 1e-5 : 1e-2;
        const at::Tensor y = qlora::detail::dense_linear(x, w);
        EXPECT_EQ(y.scalar_type(), dtype);
        EXPECT_LT(max_rel_diff(y, exact), tol) << qlora::cpu_capability_name(level) << " " << dtype;
        // A transposed weight read in place (the backward's W^T).
        EXPECT_LT(max_rel_diff(qlora::detail::dense_linear(x, w.narrow(0, 0, 1024).t()), exact_t),
                  tol)
            << qlora::cpu_capability_name(level) << " " << dtype;
        return 0;
      });
    }
  }
  // Only level avx512_bf16 multiplies bfloat16 in bfloat16.
  at_level(CpuCapability::kAvx512, [] {
    EXPECT_FALSE(qlora::cpu::native_bf16_gemm());
    return 0;
  });
}

TEST(CpuCapability, FusedCrossEntropyInBfloat16AtEveryLevel) {
  torch::manual_seed(15);
  const at::Tensor h = torch::randn({9, 64}).to(at::kBFloat16);
  const at::Tensor w = (torch::randn({500, 64}) * 0.2).to(at::kBFloat16);
  const at::Tensor labels = torch::randint(0, 500, {9}, torch::kLong);
  const at::Tensor logits = at::linear(h.to(at::kDouble), w.to(at::kDouble));
  const double exact =
      torch::nn::functional::cross_entropy(
          logits, labels, torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum))
          .item<double>();
  for (CpuCapability level : available_levels()) {
    const double loss = at_level(level, [&] {
      return qlora::nn::linear_cross_entropy_sum(h, w, labels, 1000).item<double>();
    });
    EXPECT_NEAR(loss, exact, 1e-2 * std::abs(exact)) << qlora::cpu_capability_name(level);
  }
}

TEST(CpuCapability, DropoutEqualsPortableBitForBit) {
  const at::Tensor x = torch::randn({3, 1000 + 13});
  for (double p : {0.1, 0.5}) {
    const at::Tensor ref = at_level(CpuCapability::kPortable, [&] {
      torch::manual_seed(21);
      return qlora::nn::hash_dropout(x, p);
    });
    EXPECT_GT((ref == 0).sum().item<int64_t>(), 0);
    for (CpuCapability level : available_levels()) {
      const at::Tensor y = at_level(level, [&] {
        torch::manual_seed(21);
        return qlora::nn::hash_dropout(x, p);
      });
      EXPECT_TRUE(at::equal(y.view(at::kInt), ref.view(at::kInt)))
          << qlora::cpu_capability_name(level);
    }
  }
}

}  // namespace
