// Writing GGUF v3 files that llama.cpp's C reader (gguf_init_from_file) and
// model loader accept, and that GgufReader re-reads with strict offsets.
//
// Layout, little-endian: "GGUF", uint32 3, uint64 tensor count, uint64 KV
// count, the KVs in the order added (general.alignment = 32 as UINT32 is
// added by the constructor), one info per tensor in the order added (name,
// n_dims, ne in ggml order: ne[0] = the last PyTorch dim, ggml type, offset),
// zero padding to the alignment, then the tensors back to back in info
// order, each padded with zeros to the alignment, so that every offset is
// exactly the previous tensor's padded end (llama.cpp's rule).
//
// Every mistake llama.cpp would refuse is refused when it is made, with a
// GgufError naming the key or tensor: duplicate keys or tensor names, names
// of 64 bytes or more, more than 4 dims, data that does not fit the type's
// block size. Tensors added with add_tensor / add_tensor_raw are held in
// memory until write(); add_tensor_lazy streams: the file is written holding
// one tensor at a time.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <set>
#include <string>
#include <vector>

#include "qlora/io/gguf.h"

namespace qlora::io {

class GgufWriter {
 public:
  static constexpr uint32_t kDefaultAlignment = 32;

  // Adds general.alignment (UINT32) as the first key.
  explicit GgufWriter(uint32_t alignment = kDefaultAlignment);

  // Scalars and strings, stored with exactly the named type.
  void add_u8(const std::string& key, uint8_t value);
  void add_i8(const std::string& key, int8_t value);
  void add_u16(const std::string& key, uint16_t value);
  void add_i16(const std::string& key, int16_t value);
  void add_u32(const std::string& key, uint32_t value);
  void add_i32(const std::string& key, int32_t value);
  void add_u64(const std::string& key, uint64_t value);
  void add_i64(const std::string& key, int64_t value);
  void add_f32(const std::string& key, float value);
  void add_f64(const std::string& key, double value);
  void add_bool(const std::string& key, bool value);
  void add_string(const std::string& key, const std::string& value);

  // Arrays (GGUF has no nested arrays).
  void add_string_array(const std::string& key, const std::vector<std::string>& values);
  void add_f32_array(const std::string& key, const std::vector<float>& values);
  void add_i32_array(const std::string& key, const std::vector<int32_t>& values);
  void add_u32_array(const std::string& key, const std::vector<uint32_t>& values);
  void add_i64_array(const std::string& key, const std::vector<int64_t>& values);
  // An array of any fixed-size element type, `count` elements of
  // little-endian `bytes` (count * element size bytes).
  void add_array_raw(const std::string& key, GgufType element_type, uint64_t count,
                     std::vector<uint8_t> bytes);

  // Copies a value read by GgufReader with its exact type (under its own
  // key, or `key` when non-empty).
  void add_value(const GgufValue& value, const std::string& key = "");

  bool has_key(const std::string& key) const { return keys_.count(key) != 0; }

  // `data` (any floating dtype, any device, contiguous or not) converted to
  // float32 and stored as `type` (F32, F16, BF16, Q8_0 or Q4_0; Q8_0 / Q4_0
  // bit-exact with ggml's reference quantizers). The PyTorch shape reversed
  // is ne; a quantised type needs the last dim to be a multiple of 32.
  void add_tensor(const std::string& name, const at::Tensor& data, GgmlType type);
  // As add_tensor, but the data is asked of `produce` only when write()
  // reaches this tensor (it must return a floating tensor of `shape`), and
  // its encoded bytes are dropped once written: a file of any size is
  // written with one tensor in memory. Shape and type are checked here, so
  // a file that cannot be written fails before a byte is written.
  void add_tensor_lazy(const std::string& name, const std::vector<int64_t>& shape, GgmlType type,
                       std::function<at::Tensor()> produce);
  // Already-encoded bytes of `type` for a tensor of ggml dims `ne`.
  void add_tensor_raw(const std::string& name, const std::vector<int64_t>& ne, GgmlType type,
                      std::vector<uint8_t> bytes);

  size_t tensor_count() const { return tensors_.size(); }
  size_t kv_count() const { return kv_count_; }
  bool has_tensor(const std::string& name) const { return tensor_names_.count(name) != 0; }

  // Writes the file atomically (a temporary file renamed over `path`).
  void write(const std::string& path) const;

 private:
  struct Tensor {
    std::string name;
    std::vector<int64_t> ne;
    GgmlType type;
    uint64_t nbytes;
    std::vector<uint8_t> bytes;           // add_tensor / add_tensor_raw
    std::function<at::Tensor()> produce;  // add_tensor_lazy
  };

  // Checks a tensor's name, dims and row length against `type`; returns its bytes.
  uint64_t checked_nbytes(const std::string& name, const std::vector<int64_t>& ne,
                          GgmlType type) const;
  static std::vector<uint8_t> encode(const std::string& name, const at::Tensor& data,
                                     GgmlType type);

  void begin_kv(const std::string& key, GgufType type);
  void put_string(const std::string& s);
  template <typename T>
  void put(T value);
  void check_tensor_name(const std::string& name) const;

  uint32_t alignment_;
  std::vector<uint8_t> kv_bytes_;  // the encoded KV section
  uint64_t kv_count_ = 0;
  std::set<std::string> keys_;
  std::vector<Tensor> tensors_;
  std::set<std::string> tensor_names_;
};

}  // namespace qlora::io
