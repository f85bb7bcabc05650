#include <ATen/ATen.h>
#include <dirent.h>
#include <ftw.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <iterator>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "qlora/io/atomic_file.h"
#include "qlora/io/safetensors.h"
#include "test_utils.h"

namespace qlora::io {
namespace {

using test::read_bytes;
using test::write_bytes;

using NamedTensors = std::vector<std::pair<std::string, at::Tensor>>;

const std::vector<at::ScalarType> kAllDtypes = {
    at::kDouble,
    at::kFloat,
    at::kHalf,
    at::kBFloat16,
    at::kComplexFloat,
    at::kLong,
    at::kInt,
    at::kShort,
    at::kChar,
    at::kUInt64,
    at::kUInt32,
    at::kUInt16,
    at::kByte,
    at::kBool,
    at::kFloat8_e4m3fn,
    at::kFloat8_e5m2,
    at::kFloat8_e4m3fnuz,
    at::kFloat8_e5m2fnuz,
};

const std::vector<std::vector<int64_t>> kShapes = {{}, {0}, {3, 0, 2}, {1}, {7}, {3, 5}, {2, 3, 5}};

// Uniformly random bytes, so every bit pattern (NaNs included) is exercised.
at::Tensor random_tensor(at::ScalarType dtype, const std::vector<int64_t>& shape) {
  const int64_t numel = c10::multiply_integers(shape);
  if (dtype == at::kBool) return at::randint(0, 2, shape, at::kByte).to(at::kBool);
  const int64_t nbytes = numel * static_cast<int64_t>(c10::elementSize(dtype));
  return at::randint(0, 256, {nbytes}, at::kByte).view(dtype).reshape(shape);
}

// Exact equality, NaN payloads included, for every dtype (some lack eq kernels).
void expect_bitwise_equal(const at::Tensor& actual, const at::Tensor& expected,
                          const std::string& what) {
  ASSERT_EQ(actual.scalar_type(), expected.scalar_type()) << what;
  ASSERT_EQ(actual.sizes(), expected.sizes()) << what;
  const auto bytes = [](const at::Tensor& t) { return t.contiguous().reshape(-1).view(at::kByte); };
  EXPECT_TRUE(at::equal(bytes(actual), bytes(expected))) << what;
}

std::string u64_le(uint64_t v) {
  std::string out(8, '\0');
  std::memcpy(out.data(), &v, 8);
  return out;
}

// An 8-byte length prefix (the header's own length unless overridden), the
// header and the data section.
std::string header_file(const std::string& header, const std::string& data = "",
                        uint64_t length = UINT64_MAX) {
  return u64_le(length == UINT64_MAX ? header.size() : length) + header + data;
}

// The message of the exception `fn` throws, or a marker when it throws none.
std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "<no exception>";
}

// std::filesystem is avoided: the torch wheels export broken copies of its
// symbols that replace libstdc++'s (pytorch/pytorch#133437).
void remove_tree(const std::string& path) {
  ::nftw(
      path.c_str(),
      [](const char* p, const struct stat*, int, struct FTW*) { return std::remove(p); }, 16,
      FTW_DEPTH | FTW_PHYS);
}

class SafetensorsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern = ::testing::TempDir() + "qlora_safetensors_XXXXXX";
    ASSERT_NE(::mkdtemp(pattern.data()), nullptr) << pattern << ": " << std::strerror(errno);
    dir_ = pattern;
  }
  void TearDown() override { remove_tree(dir_); }

  std::string file(const std::string& name) const { return dir_ + "/" + name; }

  std::vector<std::string> dir_entries() const {
    std::vector<std::string> names;
    DIR* d = ::opendir(dir_.c_str());
    for (const dirent* e = ::readdir(d); e != nullptr; e = ::readdir(d)) {
      if (std::strcmp(e->d_name, ".") != 0 && std::strcmp(e->d_name, "..") != 0) {
        names.push_back(e->d_name);
      }
    }
    ::closedir(d);
    std::sort(names.begin(), names.end());
    return names;
  }

  std::string dir_;
};

TEST_F(SafetensorsTest, RoundTripsEveryDtypeAndShape) {
  NamedTensors tensors;
  for (at::ScalarType dtype : kAllDtypes) {
    for (size_t i = 0; i < kShapes.size(); ++i) {
      tensors.emplace_back(
          std::string(safetensors_dtype_name(dtype)) + "/shape" + std::to_string(i),
          random_tensor(dtype, kShapes[i]));
    }
  }
  save_safetensors(file("all.safetensors"), tensors);

  const SafetensorsReader reader = SafetensorsReader::open(file("all.safetensors"));
  ASSERT_EQ(reader.tensors().size(), tensors.size());
  for (const auto& [name, expected] : tensors) {
    ASSERT_TRUE(reader.contains(name)) << name;
    EXPECT_EQ(reader.info(name).dtype, expected.scalar_type()) << name;
    EXPECT_EQ(at::IntArrayRef(reader.info(name).shape), expected.sizes()) << name;
    expect_bitwise_equal(reader.get(name), expected, name + " (view)");
    expect_bitwise_equal(reader.get(name, /*copy=*/true), expected, name + " (copy)");
  }
  const auto all = reader.load_all();
  ASSERT_EQ(all.size(), tensors.size());
  for (const auto& [name, expected] : tensors) expect_bitwise_equal(all.at(name), expected, name);
}

TEST_F(SafetensorsTest, DtypeNamesMapBothWays) {
  for (at::ScalarType dtype : kAllDtypes) {
    EXPECT_EQ(scalar_type_from_safetensors(safetensors_dtype_name(dtype)), dtype);
  }
  EXPECT_THROW(safetensors_dtype_name(at::kComplexDouble), SafetensorsError);
  EXPECT_THROW(scalar_type_from_safetensors("F8_E8M0"), SafetensorsError);
}

TEST_F(SafetensorsTest, RoundTripsMetadata) {
  const std::map<std::string, std::string> metadata = {{"format", "pt"},
                                                       {"quote\"d", "line\nbreak\ttab\\"},
                                                       {"unicode", "ünï ✓"},
                                                       {"", "empty key"}};
  save_safetensors(file("m.safetensors"), NamedTensors{{"w", at::ones({2})}}, metadata);
  EXPECT_EQ(SafetensorsReader::open(file("m.safetensors")).metadata(), metadata);

  save_safetensors(file("none.safetensors"), NamedTensors{{"w", at::ones({2})}});
  EXPECT_TRUE(SafetensorsReader::open(file("none.safetensors")).metadata().empty());
  EXPECT_EQ(read_bytes(file("none.safetensors")).find("__metadata__"), std::string::npos);
}

TEST_F(SafetensorsTest, WritesPythonsHeaderLayoutAndOrder) {
  save_safetensors(file("h.safetensors"), NamedTensors{{"a", at::zeros({2})}});
  const std::string header = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  const std::string padded = header + std::string(8 - header.size() % 8, ' ');
  EXPECT_EQ(read_bytes(file("h.safetensors")), header_file(padded, std::string(8, '\0')));

  // Larger alignment first, then by name, whatever the input order.
  save_safetensors(file("o.safetensors"), NamedTensors{{"b8", at::zeros({3}, at::kByte)},
                                                       {"b32", at::zeros({1})},
                                                       {"a32", at::zeros({1})},
                                                       {"z64", at::zeros({1}, at::kDouble)},
                                                       {"a1", at::zeros({1}, at::kBool)}});
  const SafetensorsReader reader = SafetensorsReader::open(file("o.safetensors"));
  std::vector<std::string> order;
  for (const TensorInfo& t : reader.tensors()) order.push_back(t.name);
  EXPECT_EQ(order, (std::vector<std::string>{"z64", "a32", "b32", "b8", "a1"}));
}

TEST_F(SafetensorsTest, MapAndVectorOverloadsWriteTheSameBytes) {
  const std::map<std::string, at::Tensor> tensors = {{"x", at::randn({4, 4})},
                                                     {"y", at::arange(5)}};
  save_safetensors(file("map.safetensors"), tensors, {{"k", "v"}});
  save_safetensors(file("vec.safetensors"),
                   NamedTensors{{"y", tensors.at("y")}, {"x", tensors.at("x")}}, {{"k", "v"}});
  EXPECT_EQ(read_bytes(file("map.safetensors")), read_bytes(file("vec.safetensors")));
}

TEST_F(SafetensorsTest, WritesNonContiguousAndLazyViewsByValue) {
  const at::Tensor base = at::randn({4, 6});
  const at::Tensor complex = at::randn({3}, at::kComplexFloat);
  const NamedTensors tensors = {{"transposed", base.t()},
                                {"strided", base.slice(1, 0, 6, 2)},
                                {"expanded", at::randn({1, 3}).expand({4, 3})},
                                {"conj", complex.conj()},
                                {"neg", at::_neg_view(complex)}};
  save_safetensors(file("v.safetensors"), tensors);
  const SafetensorsReader reader = SafetensorsReader::open(file("v.safetensors"));
  for (const auto& [name, t] : tensors) {
    expect_bitwise_equal(reader.get(name), t.resolve_conj().resolve_neg().contiguous(), name);
  }
}

TEST_F(SafetensorsTest, WriterRejectsBadInputsWithoutCreatingTheFile) {
  const at::Tensor ok = at::zeros({1});
  const std::vector<std::pair<NamedTensors, std::string>> cases = {
      {{{"", ok}}, "non-empty"},
      {{{"a", ok}, {"a", ok}}, "'a' appears twice"},
      {{{"__metadata__", ok}}, "reserved for metadata"},
      {{{"u", at::Tensor()}}, "'u' is undefined"},
      {{{"c", at::zeros({1}, at::kComplexDouble)}}, "'c' has dtype ComplexDouble"},
      {{{"s", ok.to_sparse()}}, "'s' is not dense"},
      {{{"m", at::zeros({1}, at::TensorOptions().device(at::kMeta))}}, "meta device"},
      {{{"bad\xff", ok}}, "not valid UTF-8"},
  };
  for (const auto& c : cases) {
    const NamedTensors& tensors = c.first;  // not a structured binding: clang 14 cannot capture one
    const std::string& expected = c.second;
    const std::string error = error_of([&] { save_safetensors(file("bad.safetensors"), tensors); });
    EXPECT_NE(error.find(expected), std::string::npos) << error;
    EXPECT_NE(error.find(file("bad.safetensors")), std::string::npos) << error;
  }
  EXPECT_TRUE(dir_entries().empty());
}

TEST_F(SafetensorsTest, ZeroCopyViewOutlivesReaderAndFile) {
  const at::Tensor expected = at::randn({64, 3});
  save_safetensors(file("z.safetensors"), NamedTensors{{"w", expected}});
  at::Tensor view;
  {
    const SafetensorsReader reader = SafetensorsReader::open(file("z.safetensors"));
    view = reader.get("w");
    EXPECT_EQ(view.data_ptr(), reader.get("w").data_ptr()) << "views share the mapping";
    EXPECT_NE(view.data_ptr(), reader.get("w", /*copy=*/true).data_ptr());
  }
  // Replace, then delete, the file: the mapping still holds the old bytes.
  save_safetensors(file("z.safetensors"), NamedTensors{{"w", at::zeros({64, 3})}});
  std::remove(file("z.safetensors").c_str());
  expect_bitwise_equal(view, expected, "view after reader and file are gone");
}

TEST_F(SafetensorsTest, InPlaceOpsOnViewsNeverReachTheFile) {
  save_safetensors(file("cow.safetensors"), NamedTensors{{"w", at::ones({8})}});
  SafetensorsReader::open(file("cow.safetensors")).get("w").add_(1);
  expect_bitwise_equal(SafetensorsReader::open(file("cow.safetensors")).get("w"), at::ones({8}),
                       "reopened");
}

TEST_F(SafetensorsTest, MisalignedDataIsCopiedNotViewed) {
  // Header padding that puts the data at an odd file offset: no F32 can be viewed there.
  const at::Tensor expected = at::arange(6, at::kFloat);
  std::string header = R"({"w":{"dtype":"F32","shape":[6],"data_offsets":[0,24]}})";
  while ((8 + header.size()) % 4 != 1) header += ' ';
  std::string data(24, '\0');
  std::memcpy(data.data(), expected.const_data_ptr(), 24);
  write_bytes(file("odd.safetensors"), header_file(header, data));

  const at::Tensor got = SafetensorsReader::open(file("odd.safetensors")).get("w");
  EXPECT_EQ(reinterpret_cast<uintptr_t>(got.const_data_ptr()) % alignof(float), 0u);
  expect_bitwise_equal(got, expected, "misaligned");
}

TEST_F(SafetensorsTest, EmptyCheckpointRoundTrips) {
  save_safetensors(file("e.safetensors"), NamedTensors{});
  EXPECT_EQ(read_bytes(file("e.safetensors")), header_file("{}      "));
  EXPECT_TRUE(SafetensorsReader::open(file("e.safetensors")).tensors().empty());
}

struct MalformedCase {
  std::string name;
  std::string contents;
  std::string expected;
};

std::string f32(uint64_t begin, uint64_t end, const std::string& shape = "[1]") {
  return R"({"dtype":"F32","shape":)" + shape + R"(,"data_offsets":[)" + std::to_string(begin) +
         "," + std::to_string(end) + "]}";
}

const std::vector<MalformedCase> kMalformed = {
    {"empty", "", "shorter than the 8-byte header length prefix"},
    {"truncated", std::string("\x10\x00\x00", 3), "shorter than the 8-byte header length prefix"},
    {"header-length-huge", header_file("{}", "", uint64_t{1} << 62), "exceeds the limit"},
    {"header-length-past-eof", header_file("{}", "", 4096), "truncated file?"},
    {"invalid-json", header_file(R"({"a": {)"), "header is not valid JSON"},
    {"nul-padding", header_file(std::string("{}\0\0", 4)), "header is not valid JSON"},
    {"not-object", header_file("[]"), "header must be a JSON object"},
    {"duplicate-key", header_file(R"({"a":)" + f32(0, 4) + R"(,"a":)" + f32(0, 4) + "}", "abcd"),
     "key 'a' twice"},
    {"too-deep", header_file(std::string(100, '[') + std::string(100, ']')), "nests deeper"},
    {"entry-not-object", header_file(R"({"a":[]})"), "entry must be an object"},
    {"missing-dtype", header_file(R"({"a":{"shape":[1],"data_offsets":[0,4]}})", "abcd"),
     "tensor 'a': missing \"dtype\""},
    {"dtype-not-string",
     header_file(R"({"a":{"dtype":7,"shape":[1],"data_offsets":[0,4]}})", "abcd"),
     "\"dtype\" must be a string"},
    {"bad-dtype", header_file(R"({"a":{"dtype":"F33","shape":[1],"data_offsets":[0,4]}})", "abcd"),
     "unknown dtype \"F33\""},
    {"negative-dim", header_file(R"({"a":)" + f32(0, 4, "[-1]") + "}", "abcd"),
     "negative dimension -1"},
    {"float-dim", header_file(R"({"a":)" + f32(0, 4, "[1.0]") + "}", "abcd"),
     "non-negative integers"},
    {"shape-overflow", header_file(R"({"a":)" + f32(0, 4, "[4294967296,4294967296]") + "}", "abcd"),
     "overflows 64-bit sizes"},
    {"offsets-arity",
     header_file(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0]}})", "abcd"),
     "must be [begin, end]"},
    {"offsets-reversed", header_file(R"({"a":)" + f32(4, 0) + "}", "abcd"), "begin > end"},
    {"offsets-out-of-bounds", header_file(R"({"a":)" + f32(0, 4) + "}", "ab"),
     "end beyond the data section of 2 bytes"},
    {"byte-length-mismatch", header_file(R"({"a":)" + f32(0, 8) + "}", "abcdefgh"),
     "span 8 bytes but shape [1] of F32 needs 4 bytes"},
    {"overlap",
     header_file(R"({"a":)" + f32(0, 8, "[2]") + R"(,"b":)" + f32(4, 8) + "}", "abcdefgh"),
     "tensor 'b': bytes [4, 8] overlap tensor 'a'"},
    {"gap", header_file(R"({"a":)" + f32(0, 4) + R"(,"b":)" + f32(8, 12) + "}", "abcdefghijkl"),
     "gap of 4 bytes after tensor 'a'"},
    {"first-not-at-zero", header_file(R"({"a":)" + f32(4, 8) + "}", "abcdefgh"),
     "gap of 4 bytes after the start of the data section"},
    {"trailing-bytes", header_file(R"({"a":)" + f32(0, 4) + "}", "abcdefgh"),
     "trailing bytes are not allowed"},
    {"metadata-not-object", header_file(R"({"__metadata__":[]})"), "must be an object of strings"},
    {"metadata-not-strings", header_file(R"({"__metadata__":{"k":1}})"),
     "value for key 'k' must be a string"},
};

TEST_F(SafetensorsTest, RejectsMalformedFilesWithClearMessages) {
  for (const MalformedCase& c : kMalformed) {
    const std::string path = file(c.name + ".safetensors");
    write_bytes(path, c.contents);
    const std::string error = error_of([&] { SafetensorsReader::open(path); });
    EXPECT_NE(error.find(c.expected), std::string::npos) << c.name << ": " << error;
    EXPECT_NE(error.find(path), std::string::npos) << c.name << ": " << error;
  }
}

TEST_F(SafetensorsTest, AcceptsWhatPythonAccepts) {
  // Zero-size tensors may share an offset; null metadata means none.
  write_bytes(file("ok.safetensors"),
              header_file(R"({"__metadata__":null,"e":)" + f32(0, 0, "[0]") + R"(,"f":)" +
                              f32(0, 0, "[2,0]") + R"(,"a":)" + f32(0, 4) + "}",
                          "abcd"));
  const SafetensorsReader reader = SafetensorsReader::open(file("ok.safetensors"));
  EXPECT_EQ(reader.names(), (std::vector<std::string>{"e", "f", "a"}));
  EXPECT_EQ(reader.get("f").sizes(), at::IntArrayRef({2, 0}));
  EXPECT_TRUE(reader.metadata().empty());
}

TEST_F(SafetensorsTest, MissingTensorErrorSuggestsCloseNames) {
  save_safetensors(file("n.safetensors"), NamedTensors{{"layer.weight", at::zeros({1})},
                                                       {"model.embed", at::zeros({1})},
                                                       {"unrelated", at::zeros({1})}});
  const SafetensorsReader reader = SafetensorsReader::open(file("n.safetensors"));
  EXPECT_FALSE(reader.contains("layer.weigth"));
  const std::string typo = error_of([&] { reader.info("layer.weigth"); });
  EXPECT_NE(typo.find(file("n.safetensors")), std::string::npos) << typo;
  EXPECT_NE(typo.find("no tensor 'layer.weigth'; did you mean 'layer.weight'?"), std::string::npos)
      << typo;
  const std::string prefix = error_of([&] { reader.get("embed"); });
  EXPECT_NE(prefix.find("did you mean 'model.embed'?"), std::string::npos) << prefix;
  const std::string none = error_of([&] { reader.get("zzzzzzzzzzzz"); });
  EXPECT_EQ(none.find("did you mean"), std::string::npos) << none;
}

TEST_F(SafetensorsTest, OpenReportsMissingFile) {
  const std::string error = error_of([&] { SafetensorsReader::open(file("absent.safetensors")); });
  EXPECT_NE(error.find(file("absent.safetensors")), std::string::npos) << error;
  EXPECT_NE(error.find("No such file or directory"), std::string::npos) << error;
}

TEST_F(SafetensorsTest, AtomicWriteReplacesAndLeavesNoTempFile) {
  write_bytes_atomic(file("f.bin"), "first", 5);
  write_bytes_atomic(file("f.bin"), "second", 6);
  EXPECT_EQ(read_bytes(file("f.bin")), "second");
  EXPECT_EQ(dir_entries(), std::vector<std::string>{"f.bin"});

  // Larger than the stream buffer, written in both small and large pieces.
  std::string big(3 << 20, 'x');
  for (size_t i = 0; i < big.size(); i += 4093) big[i] = static_cast<char>(i);
  write_file_atomic(file("big.bin"), [&](std::ostream& os) {
    os.write(big.data(), 10);
    os.write(big.data() + 10, static_cast<std::streamsize>(big.size() - 20));
    for (size_t i = big.size() - 10; i < big.size(); ++i) os.put(big[i]);
  });
  EXPECT_EQ(read_bytes(file("big.bin")), big);
}

TEST_F(SafetensorsTest, FailedAtomicWriteKeepsDestinationAndCleansUp) {
  write_bytes(file("keep.bin"), "old contents");
  EXPECT_THROW(write_file_atomic(file("keep.bin"),
                                 [](std::ostream& os) {
                                   os << "partial new contents";
                                   throw std::runtime_error("writer failed");
                                 }),
               std::runtime_error);
  EXPECT_EQ(read_bytes(file("keep.bin")), "old contents");
  EXPECT_EQ(dir_entries(), std::vector<std::string>{"keep.bin"});

  const std::string missing_dir = file("no/such/dir/f.bin");
  const std::string error = error_of([&] { write_bytes_atomic(missing_dir, "x", 1); });
  EXPECT_NE(error.find(missing_dir), std::string::npos) << error;
  EXPECT_NE(error.find("No such file or directory"), std::string::npos) << error;
}

TEST_F(SafetensorsTest, MappedFileHandlesEmptyFilesAndDirectories) {
  write_bytes(file("empty"), "");
  const MappedFile empty(file("empty"));
  EXPECT_EQ(empty.size(), 0u);
  EXPECT_EQ(empty.data(), nullptr);

  write_bytes(file("small"), "abc");
  const auto small = std::make_shared<const MappedFile>(file("small"));
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(small->data()), small->size()), "abc");
  EXPECT_EQ(small->path(), file("small"));

  const std::string error = error_of([&] { MappedFile m(dir_); });
  EXPECT_NE(error.find("Is a directory"), std::string::npos) << error;
}

class ShardedSafetensorsTest : public SafetensorsTest {
 protected:
  // Two shards plus an index mapping a, b -> shard 1 and c -> shard 2.
  void write_two_shards(const std::string& index_json) {
    save_safetensors(file("model-00001-of-00002.safetensors"),
                     NamedTensors{{"a", a_}, {"b", b_}, {"unmapped", at::zeros({1})}});
    save_safetensors(file("model-00002-of-00002.safetensors"), NamedTensors{{"c", c_}});
    write_bytes(file("model.safetensors.index.json"), index_json);
  }

  static std::string index(const std::string& weight_map) {
    return R"({"metadata":{"total_size":100},"weight_map":)" + weight_map + "}";
  }

  const std::string kWeightMap =
      R"({"a":"model-00001-of-00002.safetensors","b":"model-00001-of-00002.safetensors",)"
      R"("c":"model-00002-of-00002.safetensors"})";
  at::Tensor a_ = at::randn({2, 3});
  at::Tensor b_ = at::arange(4, at::kLong);
  at::Tensor c_ = at::randn({5}).to(at::kBFloat16);
};

TEST_F(ShardedSafetensorsTest, RoutesEachTensorToItsShard) {
  write_two_shards(index(kWeightMap));
  const ShardedSafetensors checkpoint = open_checkpoint_dir(dir_);
  EXPECT_EQ(checkpoint.shards().size(), 2u);
  EXPECT_EQ(checkpoint.names(), (std::vector<std::string>{"b", "a", "c"}));
  EXPECT_FALSE(checkpoint.contains("unmapped"));
  EXPECT_EQ(checkpoint.info("c").dtype, at::kBFloat16);
  expect_bitwise_equal(checkpoint.get("a"), a_, "a");
  expect_bitwise_equal(checkpoint.get("b", /*copy=*/true), b_, "b");
  const auto all = checkpoint.load_all();
  ASSERT_EQ(all.size(), 3u);
  expect_bitwise_equal(all.at("c"), c_, "c");

  const std::string error = error_of([&] { checkpoint.get("unmapped"); });
  EXPECT_NE(error.find("no tensor 'unmapped'"), std::string::npos) << error;
}

TEST_F(ShardedSafetensorsTest, OpensASingleFileCheckpoint) {
  save_safetensors(file("model.safetensors"), NamedTensors{{"w", a_}});
  const ShardedSafetensors checkpoint = open_checkpoint_dir(dir_);
  EXPECT_EQ(checkpoint.names(), std::vector<std::string>{"w"});
  expect_bitwise_equal(checkpoint.get("w"), a_, "w");
}

TEST_F(ShardedSafetensorsTest, RejectsInconsistentIndexes) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {index(R"({"a":"model-00003-of-00002.safetensors"})"), "which does not exist"},
      {index(R"({"zz":"model-00002-of-00002.safetensors"})"),
       "tensor 'zz' maps to shard 'model-00002-of-00002.safetensors', which has no such tensor"},
      {index(R"({"a":"../model-00001-of-00002.safetensors"})"), "not a relative path"},
      {index(R"({"a":7})"), "must be a shard file name"},
      {R"({"metadata":{}})", "needs a \"weight_map\" object"},
      {"{", "is not valid JSON"},
  };
  for (const auto& [json, expected] : cases) {
    write_two_shards(json);
    const std::string error = error_of([&] { open_checkpoint_dir(dir_); });
    EXPECT_NE(error.find(expected), std::string::npos) << json << ": " << error;
    EXPECT_NE(error.find(file("model.safetensors.index.json")), std::string::npos) << error;
  }
}

TEST_F(ShardedSafetensorsTest, EmptyDirectoryNamesWhatWasLookedFor) {
  const std::string error = error_of([&] { open_checkpoint_dir(dir_); });
  EXPECT_NE(error.find(dir_), std::string::npos) << error;
  EXPECT_NE(error.find("model.safetensors.index.json"), std::string::npos) << error;
  EXPECT_NE(error.find("model.safetensors exists"), std::string::npos) << error;
}

}  // namespace
}  // namespace qlora::io
