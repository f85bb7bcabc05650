// Unit tests of the 8-bit blockwise ops with the dynamic maps.
#include <gtest/gtest.h>
#include <torch/torch.h>
#include <array>
#include <cmath>
#include <tuple>
#include <vector>

#include "common/quant_math.h"
#include "cpu/nearest_code.h"
#include "qlora/code_tables.h"
#include "qlora/ops.h"
#include "qlora/quant_state.h"
#include "test_utils.h"

namespace {

using qlora::test::expect_error;

// Independent reference: the index of the nearest code, ties to the lower
// one, by a linear scan over float32 midpoints.
int64_t nearest_code(float v, const at::Tensor& code) {
  const float* c = code.data_ptr<float>();
  int64_t rank = 0;
  for (int i = 0; i < 255; ++i) rank += v > (c[i] + c[i + 1]) / 2.0f ? 1 : 0;
  return rank;
}

TEST(Blockwise8, DynamicMapsAreSortedWithTheExpectedRange) {
  const at::Tensor s = qlora::dynamic_map(true);
  const at::Tensor u = qlora::dynamic_map(false);
  ASSERT_EQ(s.numel(), 256);
  ASSERT_EQ(u.numel(), 256);
  EXPECT_TRUE(at::equal(std::get<0>(s.sort()), s));
  EXPECT_TRUE(at::equal(std::get<0>(u.sort()), u));
  EXPECT_EQ(s.max().item<float>(), 1.0f);
  EXPECT_LT(s.min().item<float>(), -0.99f);
  EXPECT_EQ(u.min().item<float>(), 0.0f);
}

TEST(Blockwise8, CodesAreTheExactNearestAndRoundTripIsTight) {
  torch::manual_seed(0);
  const at::Tensor code = qlora::dynamic_map(true);
  for (int64_t bs : {64, 256, 4096}) {
    const at::Tensor x = torch::randn({5000}) * 3;
    auto [q, absmax] = qlora::quantize_blockwise(x, code, bs);
    ASSERT_EQ(q.sizes(), x.sizes());
    ASSERT_EQ(absmax.numel(), (5000 + bs - 1) / bs);
    const float* xp = x.data_ptr<float>();
    const uint8_t* qp = q.data_ptr<uint8_t>();
    for (int64_t i = 0; i < x.numel(); ++i) {
      const int64_t b = i / bs;
      const bool partial = (b + 1) * bs > x.numel();
      const float am = absmax[b].item<float>();
      const float v =
          partial ? std::clamp(xp[i] / am, -1.f, 1.f) : std::clamp(xp[i] * (1.0f / am), -1.f, 1.f);
      ASSERT_EQ(qp[i], nearest_code(v, code)) << "element " << i << " bs=" << bs;
    }
    const at::Tensor y = qlora::dequantize_blockwise(q, absmax, code, bs, at::kFloat);
    // The dynamic map's largest gap near +-1 is ~0.0141: error <= half of it.
    const at::Tensor scale = absmax.repeat_interleave(bs).slice(0, 0, x.numel());
    EXPECT_TRUE(((x - y).abs() <= scale * 0.0071f + 1e-6f).all().item<bool>()) << "bs=" << bs;
  }
}

TEST(Blockwise8, OutputDtypesAndShapes) {
  const at::Tensor code = qlora::dynamic_map(false);
  const at::Tensor x = torch::rand({3, 100});
  auto [q, absmax] = qlora::quantize_blockwise(x.to(at::kBFloat16), code, 64);
  EXPECT_EQ(q.sizes(), x.sizes());
  const at::Tensor y32 = qlora::dequantize_blockwise(q, absmax, code, 64, at::kFloat);
  for (auto dtype : {at::kHalf, at::kBFloat16})
    EXPECT_TRUE(at::equal(qlora::dequantize_blockwise(q, absmax, code, 64, dtype), y32.to(dtype)));
}

TEST(Blockwise8, BadInput) {
  const at::Tensor code = qlora::dynamic_map(true);
  const at::Tensor x = torch::randn({300});
  expect_error([&] { qlora::quantize_blockwise(x, code.slice(0, 0, 128), 64); },
               "code must be a float32 tensor of 256 sorted values");
  expect_error([&] { qlora::quantize_blockwise(x, code.flip(0), 64); },
               "code must be sorted ascending");
  at::Tensor bad = x.clone();
  bad[299] = std::nanf("");
  expect_error([&] { qlora::quantize_blockwise(bad, code, 256); }, "inf or NaN in block 1");
  // Named tensors, not a structured binding: clang 14 refuses those in lambdas.
  at::Tensor q, absmax;
  std::tie(q, absmax) = qlora::quantize_blockwise(x, code, 64);
  expect_error([&] { qlora::dequantize_blockwise(q, absmax, code, 256, at::kFloat); },
               "absmax has 5 elements but 300 codes in blocks of 256 need 2");
  expect_error([&] { qlora::dequantize_blockwise(q.to(at::kInt), absmax, code, 64, at::kFloat); },
               "A must be uint8");
}

}  // namespace

// The table-accelerated nearest-code search of the CPU quantizer gives the
// binary search's code (the CUDA kernels' rule) for every input that can
// reach it: the codes, the boundaries and their float neighbours, zeros of
// both signs, subnormals and random values in [-1, 1].
TEST(Blockwise8, NearestCodeTableEqualsTheBinarySearch) {
  for (bool is_signed : {true, false}) {
    const at::Tensor code = qlora::dynamic_map(is_signed);
    const float* c = code.const_data_ptr<float>();
    std::array<float, 255> bounds{};
    for (int i = 0; i < 255; ++i) bounds[i] = (c[i] + c[i + 1]) / 2.0f;
    const auto table = qlora::cpu::NearestCodeTable::for_bounds(bounds);
    std::vector<float> probes = {0.0f, -0.0f, 1e-45f, -1e-45f, 1e-38f, -1e-38f, 1.0f, -1.0f};
    for (int i = 0; i < 256; ++i) probes.push_back(c[i]);
    for (float b : bounds)
      for (float x : {b, std::nextafter(b, -2.0f), std::nextafter(b, 2.0f)}) probes.push_back(x);
    torch::manual_seed(3);
    const at::Tensor r = torch::rand({200000}) * 2 - 1;
    for (int64_t i = 0; i < r.numel(); ++i) probes.push_back(r[i].item<float>());
    for (float x : probes)
      ASSERT_EQ(table->encode(x), qlora::detail::encode_8bit(x, bounds.data()))
          << "x = " << x << (is_signed ? " (signed map)" : " (unsigned map)");
  }
}
