// QuantState: double quantization and the bitsandbytes state-dict layout.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "common/python_float.h"
#include "qlora/ops.h"
#include "qlora/quant_state.h"
#include "test_utils.h"

namespace {

using qlora::test::expect_error;

TEST(QuantState, DoubleQuantizationKeepsAbsmaxClose) {
  torch::manual_seed(0);
  const at::Tensor w = torch::randn({256, 512}).to(at::kBFloat16);
  auto [packed, st] = qlora::quantize_4bit(w, {64, "nf4", /*double_quant=*/true});
  auto [packed_plain, plain] = qlora::quantize_4bit(w, {64, "nf4", false});
  EXPECT_TRUE(at::equal(packed, packed_plain));
  ASSERT_TRUE(st.nested.has_value());
  EXPECT_EQ(st.absmax.scalar_type(), at::kByte);
  EXPECT_EQ(st.nested->absmax.numel(), (256 * 512 / 64 + 255) / 256);
  EXPECT_FLOAT_EQ(st.nested->offset, plain.absmax.mean().item<float>());
  const at::Tensor recovered = st.float_absmax();
  // 8-bit dynamic quantization of (absmax - mean): within 1% of the spread.
  const float spread = (plain.absmax - st.nested->offset).abs().max().item<float>();
  EXPECT_LT((recovered - plain.absmax).abs().max().item<float>(), 0.01f * spread);
  const at::Tensor y = qlora::dequantize_4bit(packed, st);
  EXPECT_EQ(y.scalar_type(), at::kBFloat16);
  EXPECT_EQ(y.sizes(), w.sizes());
}

TEST(QuantState, JsonIsWhatBitsandbytesWrites) {
  qlora::QuantState st;
  st.quant_type = "nf4";
  st.blocksize = 64;
  st.dtype = at::kBFloat16;
  st.shape = {4096, 11008};
  EXPECT_EQ(st.to_json(),
            "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": "
            "[4096, 11008]}");
  st.nested = qlora::NestedQuantState{};
  st.nested->offset = 0.0351486914f;
  EXPECT_EQ(st.to_json(),
            "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": "
            "[4096, 11008], \"nested_blocksize\": 256, \"nested_dtype\": \"float32\", "
            "\"nested_offset\": " +
                qlora::detail::python_float_repr(static_cast<double>(0.0351486914f)) + "}");
}

TEST(QuantState, PythonFloatRepr) {
  using qlora::detail::python_float_repr;
  EXPECT_EQ(python_float_repr(0.1), "0.1");
  EXPECT_EQ(python_float_repr(100.0), "100.0");
  EXPECT_EQ(python_float_repr(1e16), "1e+16");
  EXPECT_EQ(python_float_repr(1e-5), "1e-05");
  EXPECT_EQ(python_float_repr(0.0001), "0.0001");
  EXPECT_EQ(python_float_repr(1.5e-7), "1.5e-07");
  EXPECT_EQ(python_float_repr(-2.5), "-2.5");
  EXPECT_EQ(python_float_repr(123456.789), "123456.789");
  EXPECT_EQ(python_float_repr(static_cast<double>(0.1f)), "0.10000000149011612");
  EXPECT_EQ(python_float_repr(1.2345678901234567e+300), "1.2345678901234567e+300");
  EXPECT_EQ(python_float_repr(0.0), "0.0");
}

TEST(QuantState, StateDictRoundTrip) {
  torch::manual_seed(3);
  const at::Tensor w = torch::randn({33, 70});
  for (bool dq : {false, true}) {
    for (const char* type : {"nf4", "fp4"}) {
      auto [packed, st] = qlora::quantize_4bit(w, {128, type, dq});
      const auto sd = st.to_state_dict("layer.weight", packed);
      EXPECT_EQ(sd.size(), dq ? 6u : 4u);
      EXPECT_TRUE(sd.count("layer.weight.quant_state.bitsandbytes__" + std::string(type)));
      auto [p2, st2] = qlora::QuantState::from_state_dict("layer.weight", sd);
      EXPECT_TRUE(at::equal(p2, packed));
      EXPECT_EQ(st2.shape, st.shape);
      EXPECT_EQ(st2.blocksize, 128);
      EXPECT_EQ(st2.quant_type, type);
      EXPECT_EQ(st2.nested.has_value(), dq);
      EXPECT_TRUE(at::equal(qlora::dequantize_4bit(p2, st2), qlora::dequantize_4bit(packed, st)));
    }
  }
}

TEST(QuantState, MalformedStateDictsAreRejectedByKey) {
  const at::Tensor w = torch::randn({16, 64});
  auto [packed, st] = qlora::quantize_4bit(w, {64, "nf4", true});
  auto sd = st.to_state_dict("m.weight", packed);
  auto without = [&](const std::string& key) {
    auto copy = sd;
    copy.erase(key);
    return copy;
  };
  expect_error([&] { qlora::QuantState::from_state_dict("m.weight", without("m.weight.absmax")); },
               "missing tensor \"m.weight.absmax\"");
  expect_error(
      [&] {
        qlora::QuantState::from_state_dict("m.weight",
                                           without("m.weight.quant_state.bitsandbytes__nf4"));
      },
      "missing \"m.weight.quant_state.bitsandbytes__nf4\"");
  auto bad_map = sd;
  bad_map["m.weight.quant_map"] = qlora::code_table_4bit("fp4");
  expect_error([&] { qlora::QuantState::from_state_dict("m.weight", bad_map); },
               "differs from the standard nf4 table");
  auto bad_json = sd;
  bad_json["m.weight.quant_state.bitsandbytes__nf4"] = torch::tensor({123, 34}, at::kByte);
  expect_error([&] { qlora::QuantState::from_state_dict("m.weight", bad_json); },
               "is not a valid JSON object");
  auto short_packed = sd;
  short_packed["m.weight"] = packed.slice(0, 1);
  expect_error([&] { qlora::QuantState::from_state_dict("m.weight", short_packed); },
               "\"m.weight\" holds 511 bytes but shape [16, 64] needs 512");
}

}  // namespace
