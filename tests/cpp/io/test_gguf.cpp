// GGUF reader: files are written byte by byte here (a tiny writer below),
// so every validation rule can be broken on purpose. Dequantisation is
// checked against per-element formulas written independently of the block
// loops in ggml_dequant.cpp; bit-exactness with gguf-py / ggml on real
// quantiser output is tests/python/test_gguf_reader.py's job.
#include <ATen/ATen.h>
#include <c10/util/Half.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "qlora/io/gguf.h"
#include "qlora/models/gguf_qk_permutation.h"
#include "test_utils.h"

namespace qlora::io {
namespace {

using models::apply_llama_qk_permutation;
using models::reverse_llama_qk_permutation;
using qlora::test::expect_error;

// ------------------------------------------------------------ tiny writer

template <typename T>
std::string le(T v) {
  std::string out(sizeof(T), '\0');
  std::memcpy(out.data(), &v, sizeof(T));
  return out;
}

std::string str(const std::string& s) { return le<uint64_t>(s.size()) + s; }

std::string kv(const std::string& key, GgufType type, const std::string& payload) {
  return str(key) + le<int32_t>(static_cast<int32_t>(type)) + payload;
}

std::string kv_array(const std::string& key, GgufType element, uint64_t n,
                     const std::string& payload) {
  return str(key) + le<int32_t>(static_cast<int32_t>(GgufType::ARRAY)) +
         le<int32_t>(static_cast<int32_t>(element)) + le<uint64_t>(n) + payload;
}

struct TensorSpec {
  std::string name;
  std::vector<int64_t> ne;
  int32_t type;
  std::string data;
  std::optional<uint64_t> offset;  // default: llama.cpp's back-to-back layout
};

struct GgufSpec {
  uint32_t version = 3;
  std::vector<std::string> kvs;  // encoded with kv() / kv_array()
  std::vector<TensorSpec> tensors;
  uint64_t alignment = 32;  // layout only; add a general.alignment kv to match
  std::optional<uint64_t> n_kv;
  std::optional<uint64_t> n_tensors;
};

TensorSpec tensor(const std::string& name, std::vector<int64_t> ne, GgmlType type,
                  std::string data) {
  return {name, std::move(ne), static_cast<int32_t>(type), std::move(data), std::nullopt};
}

uint64_t pad(uint64_t n, uint64_t a) { return (n + a - 1) / a * a; }

std::string build(const GgufSpec& spec) {
  std::string out = "GGUF" + le(spec.version) +
                    le<uint64_t>(spec.n_tensors.value_or(spec.tensors.size())) +
                    le<uint64_t>(spec.n_kv.value_or(spec.kvs.size()));
  for (const std::string& entry : spec.kvs) out += entry;
  std::vector<uint64_t> offsets;
  uint64_t next = 0;
  for (const TensorSpec& t : spec.tensors) {
    const uint64_t offset = t.offset.value_or(next);
    next = offset + pad(t.data.size(), spec.alignment);
    offsets.push_back(offset);
    out += str(t.name) + le<uint32_t>(t.ne.size());
    for (int64_t n : t.ne) out += le<int64_t>(n);
    out += le<int32_t>(t.type) + le<uint64_t>(offset);
  }
  if (spec.tensors.empty()) return out;
  out.resize(pad(out.size(), spec.alignment), '\0');
  const size_t data_start = out.size();
  for (size_t i = 0; i < spec.tensors.size(); ++i) {
    const std::string& data = spec.tensors[i].data;
    if (offsets[i] > (uint64_t{1} << 30)) continue;  // absurd offsets point past the file
    const size_t begin = data_start + offsets[i];
    if (out.size() < begin + data.size()) out.resize(begin + data.size(), '\0');
    out.replace(begin, data.size(), data);
  }
  out.resize(data_start + pad(out.size() - data_start, spec.alignment), '\0');
  return out;
}

std::string f32_bytes(const std::vector<float>& values) {
  std::string out;
  for (float v : values) out += le(v);
  return out;
}

uint16_t half_bits(float v) { return c10::Half(v).x; }

// ------------------------------------------------------------ fixture

class GgufTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern = ::testing::TempDir() + "qlora_gguf_XXXXXX";
    ASSERT_NE(::mkdtemp(pattern.data()), nullptr) << pattern << ": " << std::strerror(errno);
    dir_ = pattern;
  }
  void TearDown() override {
    for (const std::string& f : files_) ::unlink(f.c_str());
    ::rmdir(dir_.c_str());
  }

  std::string write(const std::string& bytes, const std::string& name = "model.gguf") {
    const std::string path = dir_ + "/" + name;
    std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
    files_.push_back(path);
    return path;
  }

  std::string write(const GgufSpec& spec) { return write(build(spec)); }

  // Opening the file must fail with a message naming the file and `expected`.
  void expect_rejected(const std::string& bytes, const std::string& expected,
                       bool strict_offsets = true) {
    const std::string path = write(bytes);
    expect_error([&] { GgufReader::open(path, {strict_offsets}); }, expected);
    expect_error([&] { GgufReader::open(path, {strict_offsets}); }, "GGUF file '" + path + "'");
  }
  void expect_rejected(const GgufSpec& spec, const std::string& expected,
                       bool strict_offsets = true) {
    expect_rejected(build(spec), expected, strict_offsets);
  }

  std::string dir_;
  std::vector<std::string> files_;
};

TensorSpec f32_tensor(const std::string& name, std::vector<int64_t> ne) {
  int64_t n = 1;
  for (int64_t d : ne) n *= d;
  std::vector<float> values(n);
  for (int64_t i = 0; i < n; ++i) values[i] = static_cast<float>(i) + 0.5f;
  return tensor(name, std::move(ne), GgmlType::F32, f32_bytes(values));
}

// ------------------------------------------------------------ parsing

GgufSpec every_value_type() {
  GgufSpec spec;
  spec.kvs = {
      kv("general.architecture", GgufType::STRING, str("llama")),
      kv("u8", GgufType::UINT8, le<uint8_t>(200)),
      kv("i8", GgufType::INT8, le<int8_t>(-100)),
      kv("u16", GgufType::UINT16, le<uint16_t>(60000)),
      kv("i16", GgufType::INT16, le<int16_t>(-30000)),
      kv("u32", GgufType::UINT32, le<uint32_t>(4000000000u)),
      kv("i32", GgufType::INT32, le<int32_t>(-2000000000)),
      kv("f32", GgufType::FLOAT32, le<float>(0.1f)),
      kv("bool", GgufType::BOOL, le<uint8_t>(1)),
      kv("u64", GgufType::UINT64, le<uint64_t>(UINT64_MAX)),
      kv("i64", GgufType::INT64, le<int64_t>(INT64_MIN)),
      kv("f64", GgufType::FLOAT64, le<double>(0.1)),
      kv("empty", GgufType::STRING, str("")),
      kv_array("tokens", GgufType::STRING, 3, str("<s>") + str("h\xc3\xa9llo") + str("")),
      kv_array("scores", GgufType::FLOAT32, 2, le<float>(-1.5f) + le<float>(2.0f)),
      kv_array("types", GgufType::INT32, 3, le<int32_t>(1) + le<int32_t>(-3) + le<int32_t>(6)),
      kv_array("bytes", GgufType::UINT8, 2, le<uint8_t>(7) + le<uint8_t>(255)),
      kv_array("flags", GgufType::BOOL, 2, le<uint8_t>(0) + le<uint8_t>(1)),
      kv_array("nothing", GgufType::INT32, 0, ""),
  };
  return spec;
}

TEST_F(GgufTest, ReadsEveryValueTypeInFileOrder) {
  const GgufReader r = GgufReader::open(write(every_value_type()));
  EXPECT_EQ(r.version(), 3u);
  EXPECT_EQ(r.alignment(), 32u);
  EXPECT_TRUE(r.tensors().empty());
  const std::vector<std::string> keys = {"general.architecture",
                                         "u8",
                                         "i8",
                                         "u16",
                                         "i16",
                                         "u32",
                                         "i32",
                                         "f32",
                                         "bool",
                                         "u64",
                                         "i64",
                                         "f64",
                                         "empty",
                                         "tokens",
                                         "scores",
                                         "types",
                                         "bytes",
                                         "flags",
                                         "nothing"};
  EXPECT_EQ(r.keys(), keys);
  EXPECT_EQ(r.get_string("general.architecture"), "llama");
  EXPECT_EQ(r.get("u8").get_u8(), 200);
  EXPECT_EQ(r.get("i8").get_i8(), -100);
  EXPECT_EQ(r.get("u16").get_u16(), 60000);
  EXPECT_EQ(r.get("i16").get_i16(), -30000);
  EXPECT_EQ(r.get_u32("u32"), 4000000000u);
  EXPECT_EQ(r.get_i32("i32"), -2000000000);
  EXPECT_EQ(r.get_f32("f32"), 0.1f);
  EXPECT_TRUE(r.get_bool("bool"));
  EXPECT_EQ(r.get_u64("u64"), UINT64_MAX);
  EXPECT_EQ(r.get("i64").get_i64(), INT64_MIN);
  EXPECT_EQ(r.get("f64").get_f64(), 0.1);
  EXPECT_EQ(r.get_string("empty"), "");
  EXPECT_EQ(r.get_string_array("tokens"), (std::vector<std::string>{"<s>", "h\xc3\xa9llo", ""}));
  EXPECT_EQ(r.get_f32_array("scores"), (std::vector<float>{-1.5f, 2.0f}));
  EXPECT_EQ(r.get_i32_array("types"), (std::vector<int32_t>{1, -3, 6}));
  EXPECT_EQ(r.get("bytes").get_int_array(), (std::vector<int64_t>{7, 255}));
  EXPECT_TRUE(r.get_i32_array("nothing").empty());
  const GgufValue& flags = r.get("flags");
  EXPECT_TRUE(flags.is_array());
  EXPECT_EQ(flags.type(), GgufType::ARRAY);
  EXPECT_EQ(flags.element_type(), GgufType::BOOL);
  EXPECT_EQ(flags.size(), 2u);
  EXPECT_EQ(flags.to_string(), "[false, true]");
  EXPECT_EQ(r.get("tokens").to_string(2), "[\"<s>\", \"h\xc3\xa9llo\", ...]");
  EXPECT_EQ(r.get("f32").to_string(), "0.100000001");
  EXPECT_EQ(r.get("u64").to_string(), "18446744073709551615");
}

TEST_F(GgufTest, LenientIntegerGetters) {
  const GgufReader r = GgufReader::open(write(every_value_type()));
  EXPECT_EQ(r.get_int("u8"), 200);
  EXPECT_EQ(r.get_int("i16"), -30000);
  EXPECT_EQ(r.get_int("u32"), 4000000000);
  EXPECT_EQ(r.get_int("i64"), INT64_MIN);
  expect_error([&] { r.get_int("u64"); }, "key 'u64' is UINT64 18446744073709551615, too large");
  expect_error([&] { r.get_int("f32"); }, "key 'f32' is FLOAT32, expected an integer type");
  expect_error([&] { r.get_int("bool"); }, "expected an integer type");
  expect_error([&] { r.get("scores").get_int_array(); }, "is ARRAY of FLOAT32");
}

TEST_F(GgufTest, TypedGettersNameKeyAndBothTypes) {
  const std::string path = write(every_value_type());
  const GgufReader r = GgufReader::open(path);
  expect_error([&] { r.get_f32("u32"); },
               "GGUF file '" + path + "': key 'u32' is UINT32, expected FLOAT32");
  expect_error([&] { r.get_u32("i32"); }, "key 'i32' is INT32, expected UINT32");
  expect_error([&] { r.get_string("tokens"); }, "key 'tokens' is ARRAY of STRING, expected STRING");
  expect_error([&] { r.get_string_array("general.architecture"); },
               "key 'general.architecture' is STRING, expected ARRAY of STRING");
  expect_error([&] { r.get_f32_array("types"); }, "is ARRAY of INT32, expected ARRAY of FLOAT32");
  expect_error([&] { r.get_i32_array("scores"); }, "expected ARRAY of INT32");
  expect_error([&] { r.get_bool("u8"); }, "key 'u8' is UINT8, expected BOOL");
  EXPECT_FALSE(r.has("general.architectur"));
  expect_error([&] { r.get("general.architectur"); },
               "no key 'general.architectur'; did you mean 'general.architecture'?");
}

GgufSpec three_tensors() {
  GgufSpec spec;
  spec.kvs = {kv("general.architecture", GgufType::STRING, str("llama"))};
  spec.tensors = {f32_tensor("blk.0.attn_k.weight", {3, 2}), f32_tensor("norm", {5}),
                  f32_tensor("blk.0.attn_v.weight", {2, 1, 2, 2})};
  return spec;
}

TEST_F(GgufTest, TensorInfosAndData) {
  const GgufReader r = GgufReader::open(write(three_tensors()));
  ASSERT_EQ(r.tensors().size(), 3u);
  const GgufTensorInfo& k = r.tensor_info("blk.0.attn_k.weight");
  EXPECT_EQ(k.ne, (std::vector<int64_t>{3, 2}));
  EXPECT_EQ(k.torch_shape(), (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(k.type, GgmlType::F32);
  EXPECT_EQ(k.offset, 0u);
  EXPECT_EQ(k.nbytes, 24u);
  EXPECT_EQ(r.tensor_info("norm").offset, 32u);
  EXPECT_EQ(r.tensor_info("blk.0.attn_v.weight").offset, 64u);
  EXPECT_EQ(r.tensor_info("blk.0.attn_v.weight").torch_shape(), (std::vector<int64_t>{2, 2, 1, 2}));
  EXPECT_EQ(r.data_offset() % 32, 0u);

  const at::Tensor w = r.dequantize("blk.0.attn_k.weight");
  EXPECT_EQ(w.sizes(), at::IntArrayRef({2, 3}));
  EXPECT_TRUE(at::equal(w, at::arange(6, at::kFloat).reshape({2, 3}) + 0.5));
  const at::Tensor bf = r.dequantize("norm", at::kBFloat16);
  EXPECT_EQ(bf.scalar_type(), at::kBFloat16);
  EXPECT_TRUE(at::equal(bf.to(at::kFloat), at::arange(5, at::kFloat) + 0.5));
  expect_error([&] { r.dequantize("norm", at::kInt); }, "not a floating-point dtype");
  expect_error([&] { r.tensor_info("blk.0.attn_q.weight"); },
               "no tensor 'blk.0.attn_q.weight'; did you mean 'blk.0.attn_k.weight' or "
               "'blk.0.attn_v.weight'?");
}

TEST_F(GgufTest, RawIsAZeroCopyViewThatOutlivesTheReader) {
  at::Tensor raw;
  const uint8_t* data = nullptr;
  {
    const GgufReader r = GgufReader::open(write(three_tensors()));
    raw = r.raw("blk.0.attn_k.weight");
    data = r.tensor_data("blk.0.attn_k.weight");
    EXPECT_EQ(raw.scalar_type(), at::kByte);
    EXPECT_EQ(raw.sizes(), at::IntArrayRef({2, 12}));  // 3 floats per row, in bytes
    EXPECT_EQ(raw.const_data_ptr<uint8_t>(), data);
  }
  // The reader is gone; the view still holds the mapping.
  EXPECT_TRUE(at::equal(raw.view(at::kFloat), at::arange(6, at::kFloat).reshape({2, 3}) + 0.5));
}

TEST_F(GgufTest, QuantizedRawShapeCountsBlockBytes) {
  GgufSpec spec;
  spec.tensors = {tensor("q", {64, 3}, GgmlType::Q8_0, std::string(6 * 34, '\0'))};
  const GgufReader r = GgufReader::open(write(spec));
  EXPECT_EQ(r.tensor_info("q").nbytes, 6u * 34);
  EXPECT_EQ(r.raw("q").sizes(), at::IntArrayRef({3, 68}));
}

TEST_F(GgufTest, EmptyTensorsAndVersion2) {
  GgufSpec spec;
  spec.version = 2;
  spec.tensors = {f32_tensor("empty", {0, 4}), f32_tensor("x", {2})};
  const GgufReader r = GgufReader::open(write(spec));
  EXPECT_EQ(r.version(), 2u);
  EXPECT_EQ(r.dequantize("empty").sizes(), at::IntArrayRef({4, 0}));
  EXPECT_EQ(r.raw("empty").numel(), 0);
  EXPECT_EQ(r.tensor_info("x").offset, 0u);  // an empty tensor takes no padded space
}

TEST_F(GgufTest, CustomAlignment) {
  GgufSpec spec = three_tensors();
  spec.alignment = 64;
  spec.kvs.push_back(kv("general.alignment", GgufType::UINT32, le<uint32_t>(64)));
  const GgufReader r = GgufReader::open(write(spec));
  EXPECT_EQ(r.alignment(), 64u);
  EXPECT_EQ(r.data_offset() % 64, 0u);
  EXPECT_EQ(r.tensor_info("norm").offset, 64u);
  EXPECT_TRUE(at::equal(r.dequantize("norm"), at::arange(5, at::kFloat) + 0.5));
}

// ------------------------------------------------------------ header errors

TEST_F(GgufTest, RejectsTruncatedHeaders) {
  expect_rejected(std::string(), "truncated file: the magic needs 4 bytes");
  expect_rejected(std::string("GGUF") + le<uint32_t>(3) + le<uint32_t>(0),
                  "truncated file: the header's tensor count needs 8 bytes at offset 8");
  expect_rejected(std::string("GGUF") + le<uint32_t>(3) + le<uint64_t>(0),
                  "the header's key/value count");
}

TEST_F(GgufTest, RejectsBadMagicAndVersions) {
  std::string bytes = build(GgufSpec{});
  bytes[0] = 'g';
  expect_rejected(bytes,
                  "not a GGUF file: starts with bytes 67 47 55 46 ('gGUF'), expected 'GGUF'");
  GgufSpec spec;
  spec.version = 1;
  expect_rejected(spec, "GGUF version 1 is not supported");
  spec.version = 4;
  expect_rejected(spec, "unsupported GGUF version 4 (this reader handles versions 2 and 3)");
  spec.version = 0;
  expect_rejected(spec, "unsupported GGUF version 0");
  spec.version = 0x03000000;  // version 3 written big-endian
  expect_rejected(spec, "looks byte-swapped");
}

TEST_F(GgufTest, RejectsCountsTheFileCannotHold) {
  GgufSpec spec = every_value_type();
  spec.n_kv = uint64_t{1} << 62;
  expect_rejected(spec, "header claims 4611686018427387904 key/value pairs");
  spec = three_tensors();
  spec.n_tensors = UINT64_MAX;
  expect_rejected(spec, "header claims 18446744073709551615 tensors");
  spec = every_value_type();
  spec.n_kv = spec.kvs.size() + 1;  // plausible count, but the entries run out
  expect_rejected(spec, "truncated file: key #19 length");
}

// ------------------------------------------------------------ key/value errors

GgufSpec with_kv(const std::string& entry) {
  GgufSpec spec;
  spec.kvs = {kv("general.architecture", GgufType::STRING, str("llama")), entry};
  return spec;
}

TEST_F(GgufTest, RejectsHugeStringLengths) {
  // A key, a string value and a string array element, each claiming 2^62 bytes.
  GgufSpec spec;
  spec.kvs = {le<uint64_t>(uint64_t{1} << 62) + "general.name"};
  expect_rejected(spec, "key #0 has length 4611686018427387904 at offset 24, more than the");
  expect_rejected(with_kv(str("name") + le<int32_t>(8) + le<uint64_t>(UINT64_MAX)),
                  "the STRING value of key 'name' has length 18446744073709551615");
  expect_rejected(with_kv(kv_array("tokens", GgufType::STRING, 2,
                                   str("a") + le<uint64_t>(uint64_t{1} << 40) + "b")),
                  "element 1 of string array 'tokens' has length 1099511627776");
}

TEST_F(GgufTest, RejectsBadArrays) {
  expect_rejected(with_kv(kv_array("nested", GgufType::ARRAY, 1, le<int32_t>(4) + le<uint64_t>(0))),
                  "key 'nested' is an array of arrays; GGUF does not allow nesting");
  expect_rejected(with_kv(kv_array("huge", GgufType::UINT32, uint64_t{1} << 61, le<uint32_t>(1))),
                  "key 'huge' claims 2305843009213693952 elements of UINT32 (at least 4 bytes "
                  "each), more than the");
  expect_rejected(with_kv(kv_array("strings", GgufType::STRING, UINT64_MAX, str("a"))),
                  "key 'strings' claims 18446744073709551615 elements of STRING");
  expect_rejected(with_kv(str("bad") + le<int32_t>(9) + le<int32_t>(13) + le<uint64_t>(0)),
                  "key 'bad' is an array of invalid value type 13");
  expect_rejected(with_kv(kv_array("flags", GgufType::BOOL, 2, le<uint8_t>(1) + le<uint8_t>(2))),
                  "key 'flags': BOOL element 1 holds the byte 2, expected 0 or 1");
}

TEST_F(GgufTest, RejectsBadKeys) {
  expect_rejected(with_kv(kv("general.architecture", GgufType::STRING, str("gpt2"))),
                  "key 'general.architecture' appears twice (entries #0 and #1)");
  expect_rejected(with_kv(kv("", GgufType::UINT8, le<uint8_t>(0))), "key #1 is empty");
  expect_rejected(with_kv(str("weird") + le<int32_t>(13) + le<uint8_t>(0)),
                  "key 'weird' has invalid value type 13 (valid: 0 to 12)");
  expect_rejected(with_kv(str("neg") + le<int32_t>(-1)), "key 'neg' has invalid value type -1");
  expect_rejected(with_kv(kv("flag", GgufType::BOOL, le<uint8_t>(0x80))),
                  "key 'flag': BOOL holds the byte 128, expected 0 or 1");
  expect_rejected(with_kv(kv("\x01\n", GgufType::BOOL, le<uint8_t>(3))),
                  "key '\\x01\\x0a': BOOL");  // garbage names are escaped
}

TEST_F(GgufTest, RejectsBadAlignment) {
  GgufSpec spec = three_tensors();
  spec.kvs.push_back(kv("general.alignment", GgufType::INT32, le<int32_t>(32)));
  expect_rejected(spec, "key 'general.alignment' must be UINT32, got INT32");
  spec.kvs.back() = kv("general.alignment", GgufType::UINT64, le<uint64_t>(32));
  expect_rejected(spec, "must be UINT32, got UINT64");
  spec.kvs.back() = kv_array("general.alignment", GgufType::UINT32, 1, le<uint32_t>(32));
  expect_rejected(spec, "must be UINT32, got ARRAY of UINT32");
  spec.kvs.back() = kv("general.alignment", GgufType::UINT32, le<uint32_t>(48));
  expect_rejected(spec, "key 'general.alignment' is 48, not a power of two");
  spec.kvs.back() = kv("general.alignment", GgufType::UINT32, le<uint32_t>(0));
  expect_rejected(spec, "key 'general.alignment' is 0, not a power of two");
}

// ------------------------------------------------------------ tensor info errors

TEST_F(GgufTest, TensorNamesMustBeShorterThan64BytesAndUnique) {
  GgufSpec spec = three_tensors();
  spec.tensors[1].name = std::string(63, 'n');
  EXPECT_NO_THROW(GgufReader::open(write(spec)));
  spec.tensors[1].name = std::string(64, 'n');
  expect_rejected(
      spec, "tensor #1 name '" + std::string(64, 'n') + "' is 64 bytes; ggml allows at most 63");
  spec.tensors[1].name = "";
  expect_rejected(spec, "tensor #1 has an empty name");
  spec.tensors[1].name = spec.tensors[0].name;
  expect_rejected(spec, "tensor name 'blk.0.attn_k.weight' appears twice (tensors #0 and #1)");
}

TEST_F(GgufTest, RejectsBadShapesAndTypes) {
  GgufSpec spec = three_tensors();
  spec.tensors[1].ne = {};
  expect_rejected(spec, "tensor 'norm' has 0 dimensions; ggml allows 1 to 4");
  spec.tensors[1].ne = {1, 1, 1, 1, 5};
  expect_rejected(spec, "tensor 'norm' has 5 dimensions");
  spec.tensors[1].ne = {5, -1};
  expect_rejected(spec, "tensor 'norm' has negative ne[1] = -1");
  spec.tensors[1].ne = {int64_t{1} << 32, int64_t{1} << 32};
  expect_rejected(spec, "tensor 'norm' has ne [4294967296, 4294967296], more elements than fit");
  spec.tensors[1].ne = {int64_t{1} << 61, 2};  // elements fit, a row's bytes (x4) do not
  expect_rejected(spec, "has rows of more bytes than fit in 63 bits");
  spec.tensors[1].ne = {int64_t{1} << 60, 4};  // rows fit, the whole tensor's bytes do not
  expect_rejected(spec, "has more bytes than fit in 64 bits");

  spec = three_tensors();
  spec.tensors[1].type = 99;
  expect_rejected(spec,
                  "tensor 'norm' has ggml type 99 (unknown), which this reader does not "
                  "support (supported: F32, F16, Q4_0");
  spec.tensors[1].type = 20;
  expect_rejected(spec, "tensor 'norm' has ggml type 20 (IQ4_NL)");
  spec.tensors[1].type = static_cast<int32_t>(GgmlType::Q4_0);
  spec.tensors[1].ne = {16};
  expect_rejected(spec,
                  "tensor 'norm' of type Q4_0 has ne[0] = 16 elements per row, not a "
                  "multiple of the block size 32");
}

// ------------------------------------------------------------ offset errors

TEST_F(GgufTest, NonSequentialOffsetsNeedLenientMode) {
  GgufSpec spec = three_tensors();
  spec.tensors[0].offset = 32;  // swap the first two tensors' places
  spec.tensors[1].offset = 0;
  spec.tensors[2].offset = 64;
  expect_rejected(spec,
                  "tensor 'blk.0.attn_k.weight' has data offset 32, expected 0: llama.cpp "
                  "requires the tensors back to back in info order");
  expect_rejected(spec, "open with strict_offsets = false");
  const GgufReader r = GgufReader::open(write(spec), {.strict_offsets = false});
  EXPECT_TRUE(at::equal(r.dequantize("norm"), at::arange(5, at::kFloat) + 0.5));
  EXPECT_TRUE(at::equal(r.dequantize("blk.0.attn_k.weight"),
                        at::arange(6, at::kFloat).reshape({2, 3}) + 0.5));

  spec = three_tensors();
  spec.tensors[2].offset = 96;  // an aligned gap
  expect_rejected(spec, "tensor 'blk.0.attn_v.weight' has data offset 96, expected 64");
  EXPECT_NO_THROW(GgufReader::open(write(spec), {.strict_offsets = false}));
}

TEST_F(GgufTest, LenientModeStillRejectsOverlaps) {
  GgufSpec spec = three_tensors();
  spec.tensors[2].offset = 0;  // 32 bytes over attn_k's 24
  expect_rejected(spec,
                  "tensor 'blk.0.attn_v.weight' at data bytes [0, 32) overlaps tensor "
                  "'blk.0.attn_k.weight' at [0, 24)",
                  /*strict_offsets=*/false);
}

TEST_F(GgufTest, RejectsMisalignedOffsets) {
  GgufSpec spec = three_tensors();
  spec.tensors[1].offset = 24;
  expect_rejected(spec, "tensor 'norm' has data offset 24, not a multiple of the alignment 32");
  expect_rejected(spec, "not a multiple of the alignment 32", /*strict_offsets=*/false);
}

TEST_F(GgufTest, RejectsTensorsPastTheEndOfTheFile) {
  std::string bytes = build(three_tensors());
  bytes.resize(bytes.size() - 32 + 31);  // cut the last tensor's final byte
  expect_rejected(bytes, "tensor 'blk.0.attn_v.weight' (32 bytes at data offset 64, file offset");
  expect_rejected(bytes, "extends past the end of the file, whose data section has 95 bytes");
  GgufSpec spec = three_tensors();
  spec.tensors[2].offset = uint64_t{1} << 63;  // aligned, absurd
  expect_rejected(spec, "extends past the end of the file", /*strict_offsets=*/false);
  // Infos that end off-alignment with nothing after them: no data section.
  bytes = build(three_tensors());
  const GgufReader r = GgufReader::open(write(bytes));
  bytes.resize(r.data_offset() - 1);
  expect_rejected(bytes, "the data section should start at byte");
}

TEST_F(GgufTest, LastTensorNeedsNoTrailingPadding) {
  GgufSpec spec = three_tensors();
  spec.tensors.pop_back();  // "norm" (20 bytes + 12 padding) is now last
  std::string bytes = build(spec);
  bytes.resize(bytes.size() - 12);
  const GgufReader r = GgufReader::open(write(bytes));
  EXPECT_TRUE(at::equal(r.dequantize("norm"), at::arange(5, at::kFloat) + 0.5));
}

// Every prefix that cuts into the metadata or the tensors must fail cleanly,
// and random corruption must fail cleanly or parse: never crash.
TEST_F(GgufTest, TruncationAndCorruptionNeverCrash) {
  GgufSpec spec = every_value_type();
  spec.tensors = three_tensors().tensors;
  const std::string bytes = build(spec);
  const GgufReader whole = GgufReader::open(write(bytes));
  const uint64_t end_of_data = whole.data_offset() + 64 + 32;
  for (uint64_t n = 0; n < end_of_data; ++n) {
    const std::string path = write(bytes.substr(0, n));
    EXPECT_THROW(GgufReader::open(path), GgufError) << "prefix of " << n << " bytes";
  }
  std::mt19937 rng(1234);
  for (int trial = 0; trial < 2000; ++trial) {
    std::string corrupt = bytes;
    for (int k = 0; k < 3; ++k) corrupt[rng() % whole.data_offset()] = static_cast<char>(rng());
    const std::string path = write(corrupt);
    try {
      const GgufReader r = GgufReader::open(path, {.strict_offsets = trial % 2 == 0});
      for (const GgufTensorInfo& t : r.tensors()) {
        if (ggml_can_dequantize(t.type)) r.dequantize(t.name);
      }
    } catch (const GgufError&) {
    }
  }
}

// ------------------------------------------------------------ dequantisation

// Reference values computed element by element from the block layouts in
// ggml-common.h, independently of the block loops under test.
float ref_half(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return c10::detail::fp16_ieee_to_fp32_value(h);
}

float ref_element(GgmlType type, const uint8_t* b, int e) {
  switch (type) {
    case GgmlType::Q8_0:
      return static_cast<int8_t>(b[2 + e]) * ref_half(b);
    case GgmlType::Q4_0:
    case GgmlType::Q4_1: {
      const int off = type == GgmlType::Q4_0 ? 2 : 4;
      const int q = e < 16 ? b[off + e] & 15 : b[off + e - 16] >> 4;
      return type == GgmlType::Q4_0 ? (q - 8) * ref_half(b) : q * ref_half(b) + ref_half(b + 2);
    }
    case GgmlType::Q5_0:
    case GgmlType::Q5_1: {
      const int off = type == GgmlType::Q5_0 ? 2 : 4;
      uint32_t qh;
      std::memcpy(&qh, b + off, 4);
      const int low = e < 16 ? b[off + 4 + e] & 15 : b[off + 4 + e - 16] >> 4;
      const int q = low | static_cast<int>((qh >> e) & 1) << 4;
      return type == GgmlType::Q5_0 ? (q - 16) * ref_half(b) : q * ref_half(b) + ref_half(b + 2);
    }
    case GgmlType::Q4_K: {
      const uint8_t* s = b + 4;  // bytes 0-3: scales 0-3, 4-7: mins 0-3, 8-11: low nibbles of 4-7
      const int j = e / 32;
      const int sc = j < 4 ? s[j] & 63 : (s[j + 4] & 15) | (s[j - 4] >> 6) << 4;
      const int mn = j < 4 ? s[j + 4] & 63 : (s[j + 4] >> 4) | (s[j] >> 6) << 4;
      const uint8_t byte = b[16 + (j / 2) * 32 + e % 32];
      const int q = j % 2 == 0 ? byte & 15 : byte >> 4;
      return (ref_half(b) * sc) * q - ref_half(b + 2) * mn;
    }
    case GgmlType::Q6_K: {
      const int half = e / 128;
      const int group = (e % 128) / 32;
      const int l = e % 32;
      const uint8_t lo = b[half * 64 + (group % 2) * 32 + l];
      const int q4 = group < 2 ? lo & 15 : lo >> 4;
      const int q2 = (b[128 + half * 32 + l] >> (2 * group)) & 3;
      const auto scale = static_cast<int8_t>(b[192 + half * 8 + group * 2 + l / 16]);
      return (ref_half(b + 208) * scale) * ((q4 | q2 << 4) - 32);
    }
    default:
      ADD_FAILURE() << "no reference for " << ggml_type_name(type);
      return 0;
  }
}

// Random blocks whose f16 scales are finite (random bits would make NaNs,
// whose payloads need not match a formula).
std::string random_blocks(GgmlType type, int64_t n_blocks, std::mt19937& rng) {
  const GgmlTypeTraits& traits = ggml_type_traits(type);
  std::string out(n_blocks * traits.type_size, '\0');
  for (char& c : out) c = static_cast<char>(rng());
  std::uniform_real_distribution<float> scale(-2.0f, 2.0f);
  for (int64_t i = 0; i < n_blocks; ++i) {
    char* b = out.data() + i * traits.type_size;
    const auto put = [&](int at) {
      const uint16_t h = half_bits(scale(rng) / 64);
      std::memcpy(b + at, &h, 2);
    };
    if (type == GgmlType::Q6_K) {
      put(208);
    } else {
      put(0);
      if (type == GgmlType::Q4_1 || type == GgmlType::Q5_1 || type == GgmlType::Q4_K) put(2);
    }
  }
  return out;
}

class GgufDequantTest : public GgufTest, public ::testing::WithParamInterface<GgmlType> {};

TEST_P(GgufDequantTest, MatchesPerElementReference) {
  const GgmlType type = GetParam();
  const GgmlTypeTraits& traits = ggml_type_traits(type);
  std::mt19937 rng(static_cast<uint32_t>(type));
  // Several rows, and enough blocks for at::parallel_for to split the work.
  const int64_t row = traits.block_size * 3;
  const int64_t rows = 4096 * 32 / traits.block_size;
  const std::string blocks = random_blocks(type, rows * 3, rng);
  GgufSpec spec;
  spec.tensors = {tensor("w", {row, rows}, type, blocks)};
  const GgufReader r = GgufReader::open(write(spec));
  const at::Tensor out = r.dequantize("w");
  ASSERT_EQ(out.sizes(), at::IntArrayRef({rows, row}));
  const float* y = out.const_data_ptr<float>();
  const auto* src = reinterpret_cast<const uint8_t*>(blocks.data());
  int64_t mismatches = 0;
  for (int64_t blk = 0; blk < rows * 3; ++blk) {
    for (int e = 0; e < traits.block_size; ++e) {
      const float want = ref_element(type, src + blk * traits.type_size, e);
      const float got = y[blk * traits.block_size + e];
      if (std::memcmp(&want, &got, 4) != 0 && mismatches++ < 5) {
        ADD_FAILURE() << traits.name << " block " << blk << " element " << e << ": got " << got
                      << ", want " << want;
      }
    }
  }
  EXPECT_EQ(mismatches, 0);
}

INSTANTIATE_TEST_SUITE_P(Quantized, GgufDequantTest,
                         ::testing::Values(GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1,
                                           GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::Q4_K,
                                           GgmlType::Q6_K),
                         [](const auto& info) { return ggml_type_name(info.param); });

TEST_F(GgufTest, DequantizesF16AndBF16Exactly) {
  // Every 16-bit pattern, NaNs included, widens exactly.
  std::string bits;
  for (uint32_t i = 0; i < 65536; ++i) bits += le<uint16_t>(static_cast<uint16_t>(i));
  GgufSpec spec;
  spec.tensors = {tensor("h", {256, 256}, GgmlType::F16, bits),
                  tensor("b", {65536}, GgmlType::BF16, bits)};
  const GgufReader r = GgufReader::open(write(spec));
  const at::Tensor all = at::arange(65536, at::kInt).to(at::kShort);
  EXPECT_TRUE(at::equal(r.dequantize("h").view(at::kInt),
                        all.view(at::kHalf).to(at::kFloat).reshape({256, 256}).view(at::kInt)));
  // bf16 -> f32 is a 16-bit shift; compare bit patterns (NaNs are kept as is).
  const at::Tensor expected_bits = all.to(at::kInt).bitwise_left_shift(16);
  EXPECT_TRUE(at::equal(r.dequantize("b").view(at::kInt), expected_bits));
}

TEST_F(GgufTest, KnownQ8_0AndQ4_0Values) {
  // Q8_0: d = 0.5, q = -16..15 twice -> q / 2.
  std::string q8 = le<uint16_t>(half_bits(0.5f));
  for (int j = 0; j < 32; ++j) q8 += static_cast<char>(j % 16 - 16 + (j / 16) * 16);
  // Q4_0: d = -0.25, byte j = (15 - j) << 4 | j: element j -> (j - 8) * d,
  // element j + 16 -> (7 - j) * d.
  std::string q4 = le<uint16_t>(half_bits(-0.25f));
  for (int j = 0; j < 16; ++j) q4 += static_cast<char>((15 - j) << 4 | j);
  GgufSpec spec;
  spec.tensors = {tensor("q8", {32}, GgmlType::Q8_0, q8), tensor("q4", {32}, GgmlType::Q4_0, q4)};
  const GgufReader r = GgufReader::open(write(spec));
  const at::Tensor a = r.dequantize("q8");
  const at::Tensor b = r.dequantize("q4");
  for (int j = 0; j < 32; ++j) {
    EXPECT_EQ(a[j].item<float>(), static_cast<float>(j % 16 - 16 + (j / 16) * 16) * 0.5f);
    const int q = j < 16 ? j : 15 - (j - 16);
    EXPECT_EQ(b[j].item<float>(), static_cast<float>(q - 8) * -0.25f) << j;
  }
}

TEST_F(GgufTest, UnsupportedTypesFailAtDequantizeNotAtOpen) {
  GgufSpec spec;
  spec.tensors = {tensor("blk.0.ffn_up.weight", {256}, GgmlType::Q3_K, std::string(110, '\0'))};
  const GgufReader r = GgufReader::open(write(spec));
  EXPECT_EQ(r.raw("blk.0.ffn_up.weight").numel(), 110);
  expect_error([&] { r.dequantize("blk.0.ffn_up.weight"); },
               "tensor 'blk.0.ffn_up.weight' has ggml type Q3_K, which cannot be dequantized "
               "(supported: F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, BF16)");
  EXPECT_TRUE(ggml_can_dequantize(GgmlType::Q5_K));
  EXPECT_FALSE(ggml_can_dequantize(GgmlType::Q2_K));
  EXPECT_TRUE(ggml_can_dequantize(GgmlType::Q6_K));
}

TEST(GgmlTypes, TraitsMatchGgml) {
  struct Expected {
    GgmlType type;
    int64_t block;
    int64_t bytes;
  };
  for (const Expected& e : {Expected{GgmlType::F32, 1, 4},
                            {GgmlType::F16, 1, 2},
                            {GgmlType::BF16, 1, 2},
                            {GgmlType::Q4_0, 32, 18},
                            {GgmlType::Q4_1, 32, 20},
                            {GgmlType::Q5_0, 32, 22},
                            {GgmlType::Q5_1, 32, 24},
                            {GgmlType::Q8_0, 32, 34},
                            {GgmlType::Q2_K, 256, 84},
                            {GgmlType::Q3_K, 256, 110},
                            {GgmlType::Q4_K, 256, 144},
                            {GgmlType::Q5_K, 256, 176},
                            {GgmlType::Q6_K, 256, 210},
                            {GgmlType::Q8_K, 256, 292}}) {
    EXPECT_EQ(ggml_type_traits(e.type).block_size, e.block) << ggml_type_name(e.type);
    EXPECT_EQ(ggml_type_traits(e.type).type_size, e.bytes) << ggml_type_name(e.type);
  }
  EXPECT_EQ(find_ggml_type(4), nullptr);
  expect_error([] { ggml_type_traits(static_cast<GgmlType>(4)); }, "unknown ggml type 4");
  EXPECT_EQ(gguf_type_name(GgufType::FLOAT64), "FLOAT64");
  EXPECT_EQ(gguf_type_name(static_cast<GgufType>(13)), "invalid type 13");
}

// ------------------------------------------------------------ Q/K permutation

TEST(LlamaQkPermutation, MatchesTheConvertScriptFormula) {
  const int64_t n_head = 3;
  const int64_t hd = 8;
  const at::Tensor hf = at::arange(n_head * hd * 2, at::kFloat).reshape({n_head * hd, 2});
  const at::Tensor gguf = apply_llama_qk_permutation(hf, n_head);
  for (int64_t h = 0; h < n_head; ++h) {
    for (int64_t i = 0; i < hd / 2; ++i) {
      for (int64_t j = 0; j < 2; ++j) {
        EXPECT_TRUE(at::equal(gguf[h * hd + 2 * i + j], hf[h * hd + j * (hd / 2) + i]));
      }
    }
  }
}

TEST(LlamaQkPermutation, ReverseUndoesApply) {
  at::manual_seed(0);
  for (const auto& [n_head, hd, cols] : std::vector<std::tuple<int64_t, int64_t, int64_t>>{
           {9, 64, 576}, {3, 64, 576}, {1, 2, 5}, {4, 6, 1}, {2, 16, 0}}) {
    const at::Tensor w = at::randn({n_head * hd, cols});
    EXPECT_TRUE(
        at::equal(reverse_llama_qk_permutation(apply_llama_qk_permutation(w, n_head), n_head), w));
    EXPECT_TRUE(
        at::equal(apply_llama_qk_permutation(reverse_llama_qk_permutation(w, n_head), n_head), w));
  }
  const at::Tensor bias = at::randn({24});
  const at::Tensor permuted = apply_llama_qk_permutation(bias, 3);
  EXPECT_FALSE(at::equal(permuted, bias));
  EXPECT_TRUE(at::equal(reverse_llama_qk_permutation(permuted, 3), bias));
  // head_dim 2 permutes nothing, but the result is still a new tensor.
  const at::Tensor tiny = at::randn({4, 3});
  const at::Tensor same = apply_llama_qk_permutation(tiny, 2);
  EXPECT_TRUE(at::equal(same, tiny));
  EXPECT_NE(same.data_ptr(), tiny.data_ptr());
}

TEST(LlamaQkPermutation, RejectsBadShapes) {
  expect_error(
      [] {
        apply_llama_qk_permutation(at::zeros({10, 4}), 3);
      },
      "apply_llama_qk_permutation: dim 0 has 10 rows, not a multiple of 2 * n_head = 6");
  expect_error([] { reverse_llama_qk_permutation(at::zeros({12}), 0); }, "n_head must be positive");
  expect_error([] { reverse_llama_qk_permutation(at::zeros({}), 1); }, "at least one dimension");
}

}  // namespace
}  // namespace qlora::io
