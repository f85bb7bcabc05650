// Unit tests of the 4-bit ops on CPU: known vectors, the bitsandbytes
// rounding/packing rules, every edge case, and the error messages.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <string>
#include <tuple>

#include "qlora/ops.h"
#include "qlora/quant_state.h"
#include "test_utils.h"

namespace {

using qlora::test::expect_error;

at::Tensor nf4() { return qlora::code_table_4bit("nf4"); }
at::Tensor fp4() { return qlora::code_table_4bit("fp4"); }

uint8_t hi(const at::Tensor& packed, int64_t j) { return packed.data_ptr<uint8_t>()[j] >> 4; }
uint8_t lo(const at::Tensor& packed, int64_t j) { return packed.data_ptr<uint8_t>()[j] & 15; }

TEST(Quantize4bit, CodeValuesMapToThemselvesAndEvenElementIsHighNibble) {
  for (const char* type : {"nf4", "fp4"}) {
    const at::Tensor table = qlora::code_table_4bit(type);
    // A block whose absmax is 1 holds every code value exactly.
    auto [packed, absmax] = qlora::quantize_4bit(table, 64, type);
    ASSERT_EQ(packed.sizes(), (at::IntArrayRef{8, 1}));
    EXPECT_EQ(absmax.item<float>(), 1.0f);
    for (int64_t j = 0; j < 8; ++j) {
      EXPECT_EQ(table[hi(packed, j)].item<float>(), table[2 * j].item<float>()) << type << " " << j;
      EXPECT_EQ(table[lo(packed, j)].item<float>(), table[2 * j + 1].item<float>()) << type;
    }
  }
  auto [packed, absmax] = qlora::quantize_4bit(nf4(), 64, "nf4");
  for (int64_t j = 0; j < 8; ++j) {
    EXPECT_EQ(hi(packed, j), 2 * j);  // NF4 codes are value-sorted
    EXPECT_EQ(lo(packed, j), 2 * j + 1);
  }
}

TEST(Quantize4bit, TiesOnAMidpointGoToTheLowerCode) {
  const at::Tensor t = nf4();
  // x = 1 keeps absmax 1; the midpoint itself sits in element 1.
  for (int k = 0; k < 15; ++k) {
    const float mid = (t[k].item<float>() + t[k + 1].item<float>()) / 2.0f;
    at::Tensor x = torch::tensor({1.0f, mid});
    auto [packed, absmax] = qlora::quantize_4bit(x, 64, "nf4");
    EXPECT_EQ(lo(packed, 0), k) << "midpoint between codes " << k << " and " << k + 1;
    const float above = std::nextafter(mid, 2.0f);
    auto [p2, a2] = qlora::quantize_4bit(torch::tensor({1.0f, above}), 64, "nf4");
    EXPECT_EQ(lo(p2, 0), k + 1);
  }
}

TEST(Quantize4bit, RoundTripErrorIsWithinHalfTheLargestCodeGap) {
  torch::manual_seed(0);
  for (const char* type : {"nf4", "fp4"}) {
    const at::Tensor table = std::get<0>(qlora::code_table_4bit(type).sort());
    const float half_gap = (table.slice(0, 1) - table.slice(0, 0, 15)).max().item<float>() / 2;
    for (int64_t bs : {32, 64, 128, 256, 512, 1024, 2048, 4096}) {
      const at::Tensor x = torch::randn({3, 1000});
      auto [packed, absmax] = qlora::quantize_4bit(x, bs, type);
      const at::Tensor y = qlora::dequantize_4bit(packed, absmax, bs, type, x.sizes(), at::kFloat);
      const int64_t n = x.numel();
      const at::Tensor padded = at::cat({x.flatten(), at::zeros({absmax.numel() * bs - n})});
      const at::Tensor block_amax = std::get<0>(padded.view({-1, bs}).abs().max(1));
      EXPECT_TRUE(at::equal(block_amax, absmax)) << type << " bs=" << bs;
      const at::Tensor bound =
          block_amax.repeat_interleave(bs).slice(0, 0, n) * half_gap * 1.0001f + 1e-7f;
      EXPECT_TRUE(((x.flatten() - y.flatten()).abs() <= bound).all().item<bool>())
          << type << " bs=" << bs;
    }
  }
}

TEST(Quantize4bit, PartialLastBlockAndOddLengthPadWithTheCodeOfZero) {
  const at::Tensor x = torch::linspace(-3, 2, 101);  // 64 + 37, odd
  auto [packed, absmax] = qlora::quantize_4bit(x, 64, "nf4");
  ASSERT_EQ(packed.size(0), 51);
  ASSERT_EQ(absmax.numel(), 2);
  EXPECT_EQ(absmax[1].item<float>(), x.slice(0, 64).abs().max().item<float>());
  EXPECT_EQ(lo(packed, 50), 7);  // NF4 code of 0.0
  auto [pf, af] = qlora::quantize_4bit(x, 64, "fp4");
  EXPECT_EQ(fp4()[lo(pf, 50)].item<float>(), 0.0f);
  const at::Tensor y = qlora::dequantize_4bit(packed, absmax, 64, "nf4", {101}, at::kFloat);
  EXPECT_EQ(y.sizes(), x.sizes());
}

TEST(Quantize4bit, AllZeroBlocksEncodeZero) {
  at::Tensor x = torch::zeros({2, 64});
  x[1].fill_(0.5);
  auto [packed, absmax] = qlora::quantize_4bit(x, 64, "nf4");
  EXPECT_EQ(absmax[0].item<float>(), 0.0f);
  for (int64_t j = 0; j < 32; ++j) EXPECT_EQ(packed.data_ptr<uint8_t>()[j], 0x77);
  const at::Tensor y = qlora::dequantize_4bit(packed, absmax, 64, "nf4", x.sizes(), at::kFloat);
  EXPECT_TRUE(at::equal(y, x));
  // A trailing partial all-zero block stores bitsandbytes' clamped absmax.
  auto [p2, a2] = qlora::quantize_4bit(torch::zeros({70}), 64, "nf4");
  EXPECT_EQ(a2[1].item<float>(), 1e-38f);
}

TEST(Quantize4bit, HalfAndBFloat16InputsMatchTheirFloat32Values) {
  torch::manual_seed(1);
  for (auto dtype : {at::kHalf, at::kBFloat16}) {
    const at::Tensor x = torch::randn({257}).to(dtype);
    auto [p16, a16] = qlora::quantize_4bit(x, 64, "nf4");
    auto [p32, a32] = qlora::quantize_4bit(x.to(at::kFloat), 64, "nf4");
    EXPECT_TRUE(at::equal(p16, p32));
    EXPECT_TRUE(at::equal(a16, a32));
    // Output dtypes: the float32 product rounded once to the dtype.
    const at::Tensor y32 = qlora::dequantize_4bit(p32, a32, 64, "nf4", {257}, at::kFloat);
    const at::Tensor y = qlora::dequantize_4bit(p32, a32, 64, "nf4", {257}, dtype);
    EXPECT_EQ(y.scalar_type(), dtype);
    EXPECT_TRUE(at::equal(y, y32.to(dtype)));
  }
}

TEST(Quantize4bit, QuantStorageReinterpretsTheBytes) {
  const at::Tensor x = torch::randn({4, 64});
  auto [bytes, absmax] = qlora::quantize_4bit(x, 64, "nf4", at::kByte);
  for (auto storage : {at::kFloat, at::kHalf, at::kBFloat16, at::kChar}) {
    auto [packed, a] = qlora::quantize_4bit(x, 64, "nf4", storage);
    EXPECT_EQ(packed.scalar_type(), storage);
    EXPECT_EQ(packed.size(1), 1);
    EXPECT_TRUE(at::equal(packed.view(at::kByte).flatten(), bytes.flatten()));
    const at::Tensor y = qlora::dequantize_4bit(packed, a, 64, "nf4", x.sizes(), at::kFloat);
    EXPECT_TRUE(
        at::equal(y, qlora::dequantize_4bit(bytes, absmax, 64, "nf4", x.sizes(), at::kFloat)));
  }
  expect_error([] { qlora::quantize_4bit(torch::randn({6}), 64, "nf4", at::kFloat); },
               "cannot be viewed as quant_storage");
}

TEST(Quantize4bit, EmptyInput) {
  auto [packed, absmax] = qlora::quantize_4bit(torch::zeros({0, 8}), 64, "nf4");
  EXPECT_EQ(packed.numel(), 0);
  EXPECT_EQ(absmax.numel(), 0);
  EXPECT_EQ(qlora::dequantize_4bit(packed, absmax, 64, "nf4", {0, 8}, at::kFloat).sizes(),
            (at::IntArrayRef{0, 8}));
}

TEST(Quantize4bit, BadInputIsRejectedWithAClearMessage) {
  const at::Tensor x = torch::randn({128});
  expect_error([&] { qlora::quantize_4bit(x, 48, "nf4"); }, "blocksize must be one of 32, 64");
  expect_error([&] { qlora::quantize_4bit(x, 8192, "nf4"); }, "got 8192");
  expect_error([&] { qlora::quantize_4bit(x, 64, "int4"); },
               "quant_type must be \"nf4\" or \"fp4\"");
  expect_error([&] { qlora::quantize_4bit(x.to(at::kDouble), 64, "nf4"); },
               "A must be float32, float16 or bfloat16");
  at::Tensor bad = x.clone();
  bad[100] = std::numeric_limits<float>::infinity();
  expect_error([&] { qlora::quantize_4bit(bad, 64, "nf4"); }, "inf or NaN in block 1");
  bad[100] = std::nanf("");
  expect_error([&] { qlora::quantize_4bit(bad, 64, "nf4"); }, "inf or NaN in block 1");

  // Named tensors, not a structured binding: clang 14 refuses those in lambdas.
  at::Tensor packed, absmax;
  std::tie(packed, absmax) = qlora::quantize_4bit(x, 64, "nf4");
  expect_error([&] { qlora::dequantize_4bit(packed, absmax, 64, "nf4", {129}, at::kFloat); },
               "A holds 64 bytes but shape [129]");
  expect_error([&] { qlora::dequantize_4bit(packed, absmax, 32, "nf4", {128}, at::kFloat); },
               "absmax has 2 elements but 128 elements in blocks of 32 need 4");
  expect_error(
      [&] { qlora::dequantize_4bit(packed, absmax.to(at::kHalf), 64, "nf4", {128}, at::kFloat); },
      "absmax must be float32");
  expect_error([&] { qlora::dequantize_4bit(packed, absmax, 64, "nf4", {128}, at::kInt); },
               "dtype must be float32, float16 or bfloat16");
}

TEST(Quantize4bit, OutVariantWritesIntoTheGivenBuffer) {
  const at::Tensor x = torch::randn({5, 64});
  at::Tensor packed, absmax;
  std::tie(packed, absmax) = qlora::quantize_4bit(x, 64, "nf4");
  at::Tensor out = torch::full({5, 64}, 7.0, at::kBFloat16);
  const void* before = out.data_ptr();
  qlora::dequantize_4bit_out(out, packed, absmax, 64, "nf4", {5, 64}, at::kBFloat16);
  EXPECT_EQ(out.data_ptr(), before);
  EXPECT_TRUE(
      at::equal(out, qlora::dequantize_4bit(packed, absmax, 64, "nf4", {5, 64}, at::kBFloat16)));
  at::Tensor wrong = torch::empty({64, 5}, at::kBFloat16);
  expect_error(
      [&] {
        qlora::dequantize_4bit_out(wrong, packed, absmax, 64, "nf4", {5, 64}, at::kBFloat16);
      },
      "out must be a contiguous BFloat16 tensor of shape [5, 64]");
}

TEST(Quantize4bit, MetaKernelsGiveShapesWithoutData) {
  const at::Tensor x = torch::empty({4096, 11008}, at::TensorOptions().device(at::kMeta));
  auto [packed, absmax] = qlora::quantize_4bit(x, 64, "nf4");
  EXPECT_TRUE(packed.is_meta());
  EXPECT_EQ(packed.sizes(), (at::IntArrayRef{4096 * 11008 / 2, 1}));
  EXPECT_EQ(absmax.sizes(), (at::IntArrayRef{4096 * 11008 / 64}));
  const at::Tensor y =
      qlora::dequantize_4bit(packed, absmax, 64, "nf4", {4096, 11008}, at::kBFloat16);
  EXPECT_EQ(y.sizes(), x.sizes());
  EXPECT_EQ(y.scalar_type(), at::kBFloat16);
  expect_error([&] { qlora::quantize_4bit(x, 100, "nf4"); }, "blocksize must be one of");
}

}  // namespace
