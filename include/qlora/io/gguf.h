// Reading GGUF, the llama.cpp / ggml model format
// (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md), and turning
// its tensors into at::Tensor.
//
// A file is, little-endian: "GGUF", uint32 version, uint64 tensor count,
// uint64 key/value count, the key/value pairs, one info record per tensor
// (name, dims, ggml type, offset), padding to `general.alignment`, then the
// data section holding every tensor at its offset.
//
// The reader is at least as strict as llama.cpp's gguf_init_from_file, plus
// the bounds checks its model loader makes: a file llama.cpp would refuse is
// refused here, with a GgufError naming the file, the key or tensor, and
// what was expected. Nothing read from the file is trusted before it is
// checked against the file size, so a corrupt count or length can neither
// crash the reader nor make it allocate without bound.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

namespace qlora::io {

class MappedFile;

// A malformed file, a missing key or tensor, a value of another type than
// asked for, or a tensor type that cannot be dequantised. (Failures of the
// OS calls themselves surface as std::system_error from MappedFile.)
class GgufError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Metadata value types, numbered as in the file.
enum class GgufType : int32_t {
  UINT8 = 0,
  INT8 = 1,
  UINT16 = 2,
  INT16 = 3,
  UINT32 = 4,
  INT32 = 5,
  FLOAT32 = 6,
  BOOL = 7,
  STRING = 8,
  ARRAY = 9,
  UINT64 = 10,
  INT64 = 11,
  FLOAT64 = 12,
};

// "UINT32", "ARRAY", ...; "invalid type N" for numbers outside the enum.
std::string gguf_type_name(GgufType type);
// Bytes of one stored scalar of `type`; 0 for STRING and ARRAY.
uint64_t gguf_scalar_bytes(GgufType type);

// The ggml tensor types this reader knows, numbered as in the file. Files
// holding any other type (IQ*, TQ*, ...) are rejected when opened, because
// without a type's block layout their offsets cannot be validated.
enum class GgmlType : int32_t {
  F32 = 0,
  F16 = 1,
  Q4_0 = 2,
  Q4_1 = 3,
  Q5_0 = 6,
  Q5_1 = 7,
  Q8_0 = 8,
  Q2_K = 10,
  Q3_K = 11,
  Q4_K = 12,
  Q5_K = 13,
  Q6_K = 14,
  Q8_K = 15,
  BF16 = 30,
};

struct GgmlTypeTraits {
  GgmlType type;
  const char* name;    // "Q4_K"
  int64_t block_size;  // elements per block (1 for F32/F16/BF16)
  int64_t type_size;   // bytes per block
};

// nullptr when `raw` is not one of GgmlType's values.
const GgmlTypeTraits* find_ggml_type(int32_t raw);
// Throws GgufError for a value outside the enum.
const GgmlTypeTraits& ggml_type_traits(GgmlType type);
// "Q4_K"; "unknown ggml type N" outside the enum.
std::string ggml_type_name(GgmlType type);
// F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K and Q6_K.
bool ggml_can_dequantize(GgmlType type);

// One metadata value: a scalar, a string, or an array of scalars or of
// strings (GGUF has no nested arrays). The typed getters require the exact
// type and otherwise throw a GgufError naming the file, the key, and the
// expected and actual types; get_int / get_int_array accept any integer
// type, for files whose writers chose another width than the spec.
class GgufValue {
 public:
  const std::string& key() const { return key_; }
  // ARRAY for arrays; see element_type().
  GgufType type() const { return type_; }
  bool is_array() const { return type_ == GgufType::ARRAY; }
  // An array's element type; a scalar's own type.
  GgufType element_type() const { return element_type_; }
  // An array's length; 1 for a scalar.
  uint64_t size() const { return count_; }

  uint8_t get_u8() const;
  int8_t get_i8() const;
  uint16_t get_u16() const;
  int16_t get_i16() const;
  uint32_t get_u32() const;
  int32_t get_i32() const;
  uint64_t get_u64() const;
  int64_t get_i64() const;
  float get_f32() const;
  double get_f64() const;
  bool get_bool() const;
  const std::string& get_string() const;
  // Any integer scalar type (not BOOL); a UINT64 above INT64_MAX throws.
  int64_t get_int() const;

  const std::vector<std::string>& get_string_array() const;
  std::vector<float> get_f32_array() const;
  std::vector<int32_t> get_i32_array() const;
  // Arrays of any integer element type (not BOOL).
  std::vector<int64_t> get_int_array() const;

  // For listings: the value in full for scalars and strings (quoted, with
  // control bytes escaped), arrays as "[a, b, ...]" with at most
  // `max_elements` elements shown. Floats print with enough digits to round
  // trip (9 for FLOAT32, 17 for FLOAT64).
  std::string to_string(size_t max_elements = 16) const;

 private:
  friend struct GgufValueAccess;  // the reader builds values
  [[noreturn]] void wrong_type(const std::string& expected) const;
  void expect_scalar(GgufType type) const;
  void expect_array(GgufType element) const;
  std::string type_str() const;
  std::string element_str(size_t i) const;

  std::string file_;  // the file and key, for error messages
  std::string key_;
  GgufType type_ = GgufType::UINT8;
  GgufType element_type_ = GgufType::UINT8;
  uint64_t count_ = 1;
  std::vector<uint8_t> bytes_;        // scalar payload(s), as stored in the file
  std::vector<std::string> strings_;  // STRING, or the elements of a string array
};

struct GgufTensorInfo {
  std::string name;
  std::vector<int64_t> ne;  // ggml order: ne[0] is the contiguous axis
  GgmlType type = GgmlType::F32;
  uint64_t offset = 0;  // relative to the data section
  uint64_t nbytes = 0;
  // ne reversed: a row-major [out, in] matrix has ne = [in, out].
  std::vector<int64_t> torch_shape() const;
  int64_t numel() const;
};

struct GgufOpenOptions {
  // llama.cpp requires the tensors to be stored back to back in info order,
  // each padded to the alignment (offset_i == offset_{i-1} +
  // pad(nbytes_{i-1})). Set false to accept any layout whose offsets are
  // aligned, in bounds and non-overlapping (gguf-py reads those).
  bool strict_offsets = true;
};

// A validated, memory-mapped GGUF file. Cheap to copy: copies share the
// mapping.
class GgufReader {
 public:
  static GgufReader open(const std::string& path, const GgufOpenOptions& options = {});

  const std::string& path() const;
  uint32_t version() const { return version_; }
  uint64_t alignment() const { return alignment_; }
  // File offset of the data section.
  uint64_t data_offset() const { return data_offset_; }

  // In file order.
  const std::vector<std::string>& keys() const { return keys_; }
  bool has(const std::string& key) const { return values_.count(key) != 0; }
  // Throws GgufError naming the file and `key`, with close matches.
  const GgufValue& get(const std::string& key) const;

  // Shorthands for get(key).get_*().
  uint32_t get_u32(const std::string& key) const { return get(key).get_u32(); }
  int32_t get_i32(const std::string& key) const { return get(key).get_i32(); }
  uint64_t get_u64(const std::string& key) const { return get(key).get_u64(); }
  float get_f32(const std::string& key) const { return get(key).get_f32(); }
  bool get_bool(const std::string& key) const { return get(key).get_bool(); }
  const std::string& get_string(const std::string& key) const { return get(key).get_string(); }
  int64_t get_int(const std::string& key) const { return get(key).get_int(); }
  const std::vector<std::string>& get_string_array(const std::string& key) const {
    return get(key).get_string_array();
  }
  std::vector<float> get_f32_array(const std::string& key) const {
    return get(key).get_f32_array();
  }
  std::vector<int32_t> get_i32_array(const std::string& key) const {
    return get(key).get_i32_array();
  }

  // In info order (for files read with strict offsets, also data order).
  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }
  bool has_tensor(const std::string& name) const { return tensor_index_.count(name) != 0; }
  // Throws GgufError naming the file and `name`, with close matches.
  const GgufTensorInfo& tensor_info(const std::string& name) const;
  // The tensor's bytes in the mapping (no particular alignment in memory
  // beyond the file's own).
  const uint8_t* tensor_data(const std::string& name) const;
  // The stored bytes as a uint8 CPU tensor viewing the mapping without a
  // copy; it keeps the mapping alive on its own. Shape: torch_shape() with
  // the last dimension counted in bytes (ne[0] / block_size * type_size),
  // one row of blocks per row. The mapping is copy-on-write: writes through
  // the view never reach the file but are seen by later raw() calls.
  at::Tensor raw(const std::string& name) const;
  // A new CPU tensor of shape torch_shape(), computed in float32 exactly as
  // ggml's reference dequantize_row_* functions do, then converted to
  // `dtype` (a floating-point type). Throws GgufError naming the tensor and
  // its type when ggml_can_dequantize(type) is false.
  at::Tensor dequantize(const std::string& name, at::ScalarType dtype = at::kFloat) const;
  // Drops the tensor's mapped pages from this process's memory once only a
  // copy of it is kept (after dequantize): a model read tensor by tensor
  // never has the whole file resident. No raw() view of it may have been
  // written to: those writes would be lost.
  void release(const std::string& name) const;

 private:
  GgufReader() = default;

  std::shared_ptr<const MappedFile> file_;
  uint32_t version_ = 0;
  uint64_t alignment_ = 32;
  uint64_t data_offset_ = 0;
  std::vector<std::string> keys_;
  std::unordered_map<std::string, GgufValue> values_;
  std::vector<GgufTensorInfo> tensors_;
  std::unordered_map<std::string, size_t> tensor_index_;  // name -> position in tensors_
};

}  // namespace qlora::io
