// GgufWriter and the ggml quantisers: files re-read by our strict
// GgufReader (the same checks as llama.cpp's gguf_init_from_file).
#include <ATen/ATen.h>
#include <c10/util/Half.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "qlora/io/gguf.h"
#include "qlora/io/gguf_writer.h"
#include "test_utils.h"

namespace qlora::io {
namespace {

using test::read_bytes;
using test::write_bytes;

using test::expect_error;
using test::TempDir;

TEST(GgufWriter, MetadataRoundTripsWithExactTypes) {
  TempDir dir;
  const std::string path = dir.write("kv.gguf", "");
  GgufWriter w;
  w.add_u8("t.u8", 200);
  w.add_i8("t.i8", -100);
  w.add_u16("t.u16", 60000);
  w.add_i16("t.i16", -30000);
  w.add_u32("t.u32", 4000000000u);
  w.add_i32("t.i32", -2000000000);
  w.add_u64("t.u64", 1ull << 40);
  w.add_i64("t.i64", -(1ll << 40));
  w.add_f32("t.f32", 1e-5f);
  w.add_f64("t.f64", 0.1);
  w.add_bool("t.bool", true);
  w.add_string("t.str", std::string("h\xc3\xa9llo\0x", 8));
  w.add_string_array("t.strs", {"a", "", "b c"});
  w.add_f32_array("t.f32s", {1.5f, -2.25f});
  w.add_i32_array("t.i32s", {1, -2, 3});
  w.add_u32_array("t.u32s", {7u, 4000000000u});
  w.add_i64_array("t.i64s", {-5});
  w.add_string_array("t.empty", {});
  EXPECT_EQ(w.kv_count(), 19u);  // general.alignment first
  w.write(path);

  const GgufReader r = GgufReader::open(path);
  EXPECT_EQ(r.version(), 3u);
  EXPECT_EQ(r.alignment(), 32u);
  ASSERT_EQ(r.keys().size(), 19u);
  EXPECT_EQ(r.keys()[0], "general.alignment");
  EXPECT_EQ(r.get("general.alignment").type(), GgufType::UINT32);
  EXPECT_EQ(r.get_u32("general.alignment"), 32u);
  EXPECT_EQ(r.get("t.u8").get_u8(), 200);
  EXPECT_EQ(r.get("t.i8").get_i8(), -100);
  EXPECT_EQ(r.get("t.u16").get_u16(), 60000);
  EXPECT_EQ(r.get("t.i16").get_i16(), -30000);
  EXPECT_EQ(r.get_u32("t.u32"), 4000000000u);
  EXPECT_EQ(r.get_i32("t.i32"), -2000000000);
  EXPECT_EQ(r.get_u64("t.u64"), 1ull << 40);
  EXPECT_EQ(r.get("t.i64").get_i64(), -(1ll << 40));
  EXPECT_EQ(r.get_f32("t.f32"), 1e-5f);
  EXPECT_EQ(r.get("t.f64").get_f64(), 0.1);
  EXPECT_TRUE(r.get_bool("t.bool"));
  EXPECT_EQ(r.get_string("t.str"), std::string("h\xc3\xa9llo\0x", 8));
  EXPECT_EQ(r.get_string_array("t.strs"), (std::vector<std::string>{"a", "", "b c"}));
  EXPECT_EQ(r.get_f32_array("t.f32s"), (std::vector<float>{1.5f, -2.25f}));
  EXPECT_EQ(r.get_i32_array("t.i32s"), (std::vector<int32_t>{1, -2, 3}));
  EXPECT_EQ(r.get("t.u32s").element_type(), GgufType::UINT32);
  EXPECT_EQ(r.get("t.u32s").get_int_array(), (std::vector<int64_t>{7, 4000000000ll}));
  EXPECT_EQ(r.get("t.i64s").element_type(), GgufType::INT64);
  EXPECT_EQ(r.get("t.empty").size(), 0u);

  // Copying every value into a new file keeps types and values.
  const std::string copy = dir.write("copy.gguf", "");
  GgufWriter w2(64);
  for (const std::string& key : r.keys()) {
    if (key != "general.alignment") w2.add_value(r.get(key));
  }
  w2.write(copy);
  const GgufReader r2 = GgufReader::open(copy);
  EXPECT_EQ(r2.alignment(), 64u);
  for (const std::string& key : r.keys()) {
    if (key == "general.alignment") continue;
    EXPECT_EQ(r2.get(key).type(), r.get(key).type()) << key;
    EXPECT_EQ(r2.get(key).element_type(), r.get(key).element_type()) << key;
    EXPECT_EQ(r2.get(key).to_string(100), r.get(key).to_string(100)) << key;
  }
}

TEST(GgufWriter, TensorsAreSequentialAlignedAndExact) {
  TempDir dir;
  const std::string path = dir.write("t.gguf", "");
  at::manual_seed(0);
  const at::Tensor a = at::randn({3, 5});           // 60 bytes: padded to 64
  const at::Tensor b = at::randn({7});              // F16: 14 bytes
  const at::Tensor c = at::randn({2, 3, 4}) * 1e3;  // BF16
  const at::Tensor d = at::randn({4, 64});          // Q8_0
  GgufWriter w;
  w.add_string("general.architecture", "llama");
  w.add_tensor("a", a, GgmlType::F32);
  w.add_tensor("b", b.to(at::kDouble), GgmlType::F16);
  w.add_tensor("c", c.transpose(0, 2).contiguous().transpose(0, 2), GgmlType::BF16);
  w.add_tensor("d", d, GgmlType::Q8_0);
  w.add_tensor_raw("raw", {3}, GgmlType::F32, std::vector<uint8_t>(12, 0));
  w.write(path);

  const std::string bytes = read_bytes(path);
  ASSERT_GE(bytes.size(), 8u);
  EXPECT_EQ(bytes.substr(0, 4), "GGUF");
  uint32_t version = 0;
  std::memcpy(&version, bytes.data() + 4, 4);
  EXPECT_EQ(version, 3u);

  const GgufReader r = GgufReader::open(path);  // strict offsets, as llama.cpp
  EXPECT_EQ(r.data_offset() % 32, 0u);
  ASSERT_EQ(r.tensors().size(), 5u);
  uint64_t expected = 0;
  for (const GgufTensorInfo& t : r.tensors()) {
    EXPECT_EQ(t.offset, expected) << t.name;
    EXPECT_EQ(t.offset % 32, 0u) << t.name;
    expected += (t.nbytes + 31) / 32 * 32;
  }
  EXPECT_EQ(bytes.size(), r.data_offset() + expected);  // the last tensor is padded too
  EXPECT_EQ(r.tensor_info("a").ne, (std::vector<int64_t>{5, 3}));
  EXPECT_EQ(r.tensor_info("c").ne, (std::vector<int64_t>{4, 3, 2}));
  EXPECT_EQ(r.tensor_info("d").type, GgmlType::Q8_0);
  EXPECT_TRUE(at::equal(r.dequantize("a"), a));
  EXPECT_TRUE(at::equal(r.dequantize("b"), b.to(at::kHalf).to(at::kFloat)));
  EXPECT_TRUE(at::equal(r.dequantize("c"), c.to(at::kBFloat16).to(at::kFloat)));
  EXPECT_TRUE(at::equal(r.dequantize("raw"), at::zeros({3})));
}

TEST(GgufWriter, RejectsWhatLlamaCppRejects) {
  GgufWriter w;
  w.add_u32("k", 1);
  expect_error([&] { w.add_string("k", "x"); }, "duplicate key 'k'");
  expect_error([&] { w.add_u32("general.alignment", 32); }, "duplicate key 'general.alignment'");
  w.add_tensor(std::string(63, 'n'), at::zeros({2}), GgmlType::F32);  // the longest allowed
  expect_error([&] { w.add_tensor(std::string(64, 'n'), at::zeros({2}), GgmlType::F32); },
               "at most 63");
  expect_error([&] { w.add_tensor(std::string(63, 'n'), at::zeros({2}), GgmlType::F32); },
               "duplicate tensor name");
  expect_error(
      [&] {
        w.add_tensor("odd", at::zeros({2, 33}), GgmlType::Q8_0);
      },
      "tensor 'odd': row length 33 is not a multiple of Q8_0's block size 32");
  expect_error([&] { w.add_tensor("odd4", at::zeros({40}), GgmlType::Q4_0); }, "tensor 'odd4'");
  expect_error([&] { w.add_tensor("k3", at::zeros({256}), GgmlType::Q3_K); },
               "cannot quantise to Q3_K");
  expect_error(
      [&] {
        w.add_tensor("five", at::zeros({1, 1, 1, 1, 1}), GgmlType::F32);
      },
      "1 to 4 dims");
  expect_error([&] { w.add_tensor_raw("short", {32}, GgmlType::Q8_0, std::vector<uint8_t>(33)); },
               "33 bytes given");
  expect_error([] { GgufWriter bad(24); }, "power of two");
  EXPECT_EQ(w.tensor_count(), 1u);
}

// The stored bytes of `data` written as `type`, read back raw.
std::vector<uint8_t> encode(const at::Tensor& data, GgmlType type) {
  TempDir dir;
  const std::string path = dir.write("one.gguf", "");
  GgufWriter w;
  w.add_tensor("t", data, type);
  w.write(path);
  const at::Tensor raw = GgufReader::open(path).raw("t").contiguous();
  const uint8_t* p = raw.data_ptr<uint8_t>();
  return std::vector<uint8_t>(p, p + raw.numel());
}

// Hand-computed blocks, following quantize_row_q{8,4}_0_ref.
TEST(GgmlQuant, ReferenceBlocks) {
  const at::Tensor x = at::arange(32, at::kFloat) - 16;  // largest magnitude: -16
  const std::vector<uint8_t> q4 = encode(x, GgmlType::Q4_0);
  ASSERT_EQ(q4.size(), 18u);
  EXPECT_EQ(q4[0] | (q4[1] << 8), 0x4000);  // d = -16 / -8 = 2
  EXPECT_EQ(q4[2], 0x80);                   // x[0] -> 0, x[16] -> 8
  EXPECT_EQ(q4[17], 0xf8);                  // x[15] -> (int)(-0.5 + 8.5) = 8, x[31] -> 16 -> 15
  const std::vector<uint8_t> q8 = encode(x, GgmlType::Q8_0);
  ASSERT_EQ(q8.size(), 34u);
  EXPECT_EQ(q8[0] | (q8[1] << 8), c10::Half(16.0f / 127.0f).x);
  EXPECT_EQ(static_cast<int8_t>(q8[2]), -127);
  EXPECT_EQ(static_cast<int8_t>(q8[2 + 24]), 64);  // 8 * 127 / 16 = 63.5 -> 64 (away from zero)
  const std::vector<uint8_t> z = encode(at::zeros({32}), GgmlType::Q4_0);
  for (size_t i = 2; i < z.size(); ++i) EXPECT_EQ(z[i], 0x88);
  const std::vector<uint8_t> bf =
      encode(at::tensor({1.0f + 1.0f / 256, 1.0f + 3.0f / 256, std::nanf("")}), GgmlType::BF16);
  ASSERT_EQ(bf.size(), 6u);
  EXPECT_EQ(bf[0] | (bf[1] << 8), 0x3f80);  // ties round to even
  EXPECT_EQ(bf[2] | (bf[3] << 8), 0x3f82);
  EXPECT_EQ((bf[4] | (bf[5] << 8)) & 0x7fc0, 0x7fc0);  // NaN stays a quiet NaN
}

TEST(GgmlQuant, Q8AndQ4RoundTripWithinTheTypesError) {
  TempDir dir;
  const std::string path = dir.write("q.gguf", "");
  at::manual_seed(1);
  const at::Tensor w = at::randn({16, 96}) * at::rand({16, 1}) * 3;
  GgufWriter writer;
  writer.add_tensor("q8", w, GgmlType::Q8_0);
  writer.add_tensor("q4", w, GgmlType::Q4_0);
  writer.write(path);
  const GgufReader r = GgufReader::open(path);
  const at::Tensor blocks = w.reshape({-1, 32});
  const at::Tensor amax = blocks.abs().amax(1, true);
  const at::Tensor e8 = (r.dequantize("q8").reshape({-1, 32}) - blocks).abs();
  const at::Tensor e4 = (r.dequantize("q4").reshape({-1, 32}) - blocks).abs();
  // Half a step plus the fp16 rounding of d (2^-11 relative, times up to 127 or 8
  // steps); Q4_0 clamps the top code (one step).
  EXPECT_TRUE((e8 <= amax * (0.5 / 127 + 1e-3) + 1e-6).all().item<bool>());
  EXPECT_TRUE((e4 <= amax / 8 * 1.01 + 1e-6).all().item<bool>());
  EXPECT_GT(e4.max().item<float>(), e8.max().item<float>());
}

}  // namespace
}  // namespace qlora::io
