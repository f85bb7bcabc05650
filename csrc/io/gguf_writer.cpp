#include "qlora/io/gguf_writer.h"

#include <algorithm>
#include <cstring>
#include <ostream>
#include <type_traits>

#include "io/ggml_quant.h"
#include "qlora/io/atomic_file.h"
#include "util/strings.h"

namespace qlora::io {

namespace {

constexpr size_t kMaxNameBytes = 64;  // GGML_MAX_NAME: names must be shorter
constexpr size_t kMaxDims = 4;

uint64_t pad_to(uint64_t n, uint64_t alignment) {
  return (n + alignment - 1) / alignment * alignment;
}

}  // namespace

template <typename T>
void GgufWriter::put(T value) {
  static_assert(std::is_trivially_copyable_v<T>, "scalar");
  uint8_t buf[sizeof(T)];
  std::memcpy(buf, &value, sizeof(T));  // the host is little-endian (as ggml assumes)
  kv_bytes_.insert(kv_bytes_.end(), buf, buf + sizeof(T));
}

void GgufWriter::put_string(const std::string& s) {
  put<uint64_t>(s.size());
  kv_bytes_.insert(kv_bytes_.end(), s.begin(), s.end());
}

GgufWriter::GgufWriter(uint32_t alignment) : alignment_(alignment) {
  if (alignment == 0 || (alignment & (alignment - 1)) != 0) {
    throw GgufError("GGUF writer: general.alignment must be a power of two, got " +
                    std::to_string(alignment));
  }
  add_u32("general.alignment", alignment);
}

void GgufWriter::begin_kv(const std::string& key, GgufType type) {
  if (key.empty()) throw GgufError("GGUF writer: empty key");
  if (!keys_.insert(key).second) throw GgufError("GGUF writer: duplicate key '" + key + "'");
  put_string(key);
  put<int32_t>(static_cast<int32_t>(type));
  ++kv_count_;
}

void GgufWriter::add_u8(const std::string& key, uint8_t v) {
  begin_kv(key, GgufType::UINT8);
  put(v);
}
void GgufWriter::add_i8(const std::string& key, int8_t v) {
  begin_kv(key, GgufType::INT8);
  put(v);
}
void GgufWriter::add_u16(const std::string& key, uint16_t v) {
  begin_kv(key, GgufType::UINT16);
  put(v);
}
void GgufWriter::add_i16(const std::string& key, int16_t v) {
  begin_kv(key, GgufType::INT16);
  put(v);
}
void GgufWriter::add_u32(const std::string& key, uint32_t v) {
  begin_kv(key, GgufType::UINT32);
  put(v);
}
void GgufWriter::add_i32(const std::string& key, int32_t v) {
  begin_kv(key, GgufType::INT32);
  put(v);
}
void GgufWriter::add_u64(const std::string& key, uint64_t v) {
  begin_kv(key, GgufType::UINT64);
  put(v);
}
void GgufWriter::add_i64(const std::string& key, int64_t v) {
  begin_kv(key, GgufType::INT64);
  put(v);
}
void GgufWriter::add_f32(const std::string& key, float v) {
  begin_kv(key, GgufType::FLOAT32);
  put(v);
}
void GgufWriter::add_f64(const std::string& key, double v) {
  begin_kv(key, GgufType::FLOAT64);
  put(v);
}
void GgufWriter::add_bool(const std::string& key, bool v) {
  begin_kv(key, GgufType::BOOL);
  put<uint8_t>(v ? 1 : 0);
}
void GgufWriter::add_string(const std::string& key, const std::string& v) {
  begin_kv(key, GgufType::STRING);
  put_string(v);
}

void GgufWriter::add_string_array(const std::string& key, const std::vector<std::string>& values) {
  begin_kv(key, GgufType::ARRAY);
  put<int32_t>(static_cast<int32_t>(GgufType::STRING));
  put<uint64_t>(values.size());
  for (const std::string& s : values) put_string(s);
}

void GgufWriter::add_array_raw(const std::string& key, GgufType element_type, uint64_t count,
                               std::vector<uint8_t> bytes) {
  const size_t size = gguf_scalar_bytes(element_type);
  if (size == 0) {
    throw GgufError("GGUF writer: key '" + key + "': array elements of type " +
                    gguf_type_name(element_type) + " need their own add_*_array");
  }
  if (bytes.size() != count * size) {
    throw GgufError("GGUF writer: key '" + key + "': " + std::to_string(bytes.size()) +
                    " bytes for " + std::to_string(count) + " elements of " +
                    gguf_type_name(element_type));
  }
  begin_kv(key, GgufType::ARRAY);
  put<int32_t>(static_cast<int32_t>(element_type));
  put<uint64_t>(count);
  kv_bytes_.insert(kv_bytes_.end(), bytes.begin(), bytes.end());
}

namespace {
template <typename T>
std::vector<uint8_t> to_bytes(const std::vector<T>& values) {
  std::vector<uint8_t> bytes(values.size() * sizeof(T));
  if (!values.empty()) std::memcpy(bytes.data(), values.data(), bytes.size());
  return bytes;
}
}  // namespace

void GgufWriter::add_f32_array(const std::string& key, const std::vector<float>& values) {
  add_array_raw(key, GgufType::FLOAT32, values.size(), to_bytes(values));
}
void GgufWriter::add_i32_array(const std::string& key, const std::vector<int32_t>& values) {
  add_array_raw(key, GgufType::INT32, values.size(), to_bytes(values));
}
void GgufWriter::add_u32_array(const std::string& key, const std::vector<uint32_t>& values) {
  add_array_raw(key, GgufType::UINT32, values.size(), to_bytes(values));
}
void GgufWriter::add_i64_array(const std::string& key, const std::vector<int64_t>& values) {
  add_array_raw(key, GgufType::INT64, values.size(), to_bytes(values));
}

void GgufWriter::add_value(const GgufValue& v, const std::string& key_override) {
  const std::string& key = key_override.empty() ? v.key() : key_override;
  if (!v.is_array()) {
    switch (v.type()) {
      case GgufType::UINT8:
        return add_u8(key, v.get_u8());
      case GgufType::INT8:
        return add_i8(key, v.get_i8());
      case GgufType::UINT16:
        return add_u16(key, v.get_u16());
      case GgufType::INT16:
        return add_i16(key, v.get_i16());
      case GgufType::UINT32:
        return add_u32(key, v.get_u32());
      case GgufType::INT32:
        return add_i32(key, v.get_i32());
      case GgufType::UINT64:
        return add_u64(key, v.get_u64());
      case GgufType::INT64:
        return add_i64(key, v.get_i64());
      case GgufType::FLOAT32:
        return add_f32(key, v.get_f32());
      case GgufType::FLOAT64:
        return add_f64(key, v.get_f64());
      case GgufType::BOOL:
        return add_bool(key, v.get_bool());
      case GgufType::STRING:
        return add_string(key, v.get_string());
      default:
        break;
    }
    throw GgufError("GGUF writer: key '" + key + "': cannot copy a value of type " +
                    gguf_type_name(v.type()));
  }
  const GgufType el = v.element_type();
  if (el == GgufType::STRING) return add_string_array(key, v.get_string_array());
  if (el == GgufType::FLOAT32) return add_f32_array(key, v.get_f32_array());
  const size_t size = gguf_scalar_bytes(el);
  if (size == 0 || el == GgufType::BOOL || el == GgufType::FLOAT64) {
    throw GgufError("GGUF writer: key '" + key + "': cannot copy an array of " +
                    gguf_type_name(el));
  }
  // Integer arrays: get_int_array widens to int64; narrow back to the
  // stored width (little-endian, two's complement: the low bytes).
  const std::vector<int64_t> ints = v.get_int_array();
  std::vector<uint8_t> bytes(ints.size() * size);
  for (size_t i = 0; i < ints.size(); ++i) {
    const uint64_t u = static_cast<uint64_t>(ints[i]);
    for (size_t b = 0; b < size; ++b) bytes[i * size + b] = static_cast<uint8_t>(u >> (8 * b));
  }
  add_array_raw(key, el, ints.size(), std::move(bytes));
}

void GgufWriter::check_tensor_name(const std::string& name) const {
  if (name.empty()) throw GgufError("GGUF writer: empty tensor name");
  if (name.size() >= kMaxNameBytes) {
    throw GgufError("GGUF writer: tensor name '" + name + "' is " + std::to_string(name.size()) +
                    " bytes; llama.cpp allows at most " + std::to_string(kMaxNameBytes - 1));
  }
  if (tensor_names_.count(name) != 0) {
    throw GgufError("GGUF writer: duplicate tensor name '" + name + "'");
  }
}

std::vector<uint8_t> GgufWriter::encode(const std::string& name, const at::Tensor& data,
                                        GgmlType type) {
  if (!data.defined() || data.dim() < 1 || data.dim() > static_cast<int64_t>(kMaxDims)) {
    throw GgufError("GGUF writer: tensor '" + name + "' needs 1 to 4 dims");
  }
  if (!at::isFloatingType(data.scalar_type())) {
    throw GgufError("GGUF writer: tensor '" + name + "' is not floating point");
  }
  const at::Tensor f = data.detach().to(at::kCPU, at::kFloat).contiguous();
  return detail::quantize_ggml(type, f.data_ptr<float>(), f.numel(), f.size(-1), name);
}

void GgufWriter::add_tensor(const std::string& name, const at::Tensor& data, GgmlType type) {
  check_tensor_name(name);
  std::vector<uint8_t> bytes = encode(name, data, type);
  add_tensor_raw(name, std::vector<int64_t>(data.sizes().rbegin(), data.sizes().rend()), type,
                 std::move(bytes));
}

void GgufWriter::add_tensor_lazy(const std::string& name, const std::vector<int64_t>& shape,
                                 GgmlType type, std::function<at::Tensor()> produce) {
  check_tensor_name(name);
  if (!detail::ggml_can_quantize(type)) {
    throw GgufError("GGUF writer: tensor '" + name + "': cannot quantise to " +
                    ggml_type_name(type));
  }
  std::vector<int64_t> ne(shape.rbegin(), shape.rend());
  const uint64_t nbytes = checked_nbytes(name, ne, type);
  tensor_names_.insert(name);
  tensors_.push_back(Tensor{name, std::move(ne), type, nbytes, {}, std::move(produce)});
}

uint64_t GgufWriter::checked_nbytes(const std::string& name, const std::vector<int64_t>& ne,
                                    GgmlType type) const {
  if (ne.empty() || ne.size() > kMaxDims) {
    throw GgufError("GGUF writer: tensor '" + name + "' needs 1 to 4 dims");
  }
  const GgmlTypeTraits& traits = ggml_type_traits(type);
  int64_t numel = 1;
  for (int64_t n : ne) {
    if (n < 1) throw GgufError("GGUF writer: tensor '" + name + "' has a dim < 1");
    numel *= n;
  }
  if (ne[0] % traits.block_size != 0) {
    throw GgufError("GGUF writer: tensor '" + name + "': row length " + std::to_string(ne[0]) +
                    " is not a multiple of " + traits.name + "'s block size " +
                    std::to_string(traits.block_size));
  }
  return static_cast<uint64_t>(numel / traits.block_size * traits.type_size);
}

void GgufWriter::add_tensor_raw(const std::string& name, const std::vector<int64_t>& ne,
                                GgmlType type, std::vector<uint8_t> bytes) {
  check_tensor_name(name);
  const uint64_t nbytes = checked_nbytes(name, ne, type);
  if (bytes.size() != nbytes) {
    throw GgufError("GGUF writer: tensor '" + name + "': " + std::to_string(bytes.size()) +
                    " bytes given, " + ggml_type_name(type) + " of this shape needs " +
                    std::to_string(nbytes));
  }
  tensor_names_.insert(name);
  tensors_.push_back(Tensor{name, ne, type, nbytes, std::move(bytes), {}});
}

void GgufWriter::write(const std::string& path) const {
  std::vector<uint8_t> head;
  auto put_head = [&head](const void* p, size_t n) {
    const auto* b = static_cast<const uint8_t*>(p);
    head.insert(head.end(), b, b + n);
  };
  auto put_u32 = [&](uint32_t v) { put_head(&v, 4); };
  auto put_u64 = [&](uint64_t v) { put_head(&v, 8); };
  put_head("GGUF", 4);
  put_u32(3);
  put_u64(tensors_.size());
  put_u64(kv_count_);
  head.insert(head.end(), kv_bytes_.begin(), kv_bytes_.end());
  uint64_t offset = 0;
  for (const Tensor& t : tensors_) {
    put_u64(t.name.size());
    put_head(t.name.data(), t.name.size());
    put_u32(static_cast<uint32_t>(t.ne.size()));
    for (int64_t n : t.ne) put_head(&n, 8);
    const int32_t type = static_cast<int32_t>(t.type);
    put_head(&type, 4);
    put_u64(offset);
    offset += pad_to(t.nbytes, alignment_);
  }
  head.resize(pad_to(head.size(), alignment_), 0);
  static const char zeros[256] = {};
  write_file_atomic(path, [&](std::ostream& os) {
    os.write(reinterpret_cast<const char*>(head.data()), static_cast<std::streamsize>(head.size()));
    for (const Tensor& t : tensors_) {
      std::vector<uint8_t> produced;
      if (t.produce) {
        const at::Tensor data = t.produce();
        const std::vector<int64_t> shape(t.ne.rbegin(), t.ne.rend());
        if (!data.defined() || data.sizes().vec() != shape) {
          throw GgufError("GGUF writer: tensor '" + t.name + "': the data has shape " +
                          (data.defined() ? util::shape_str(data.sizes().vec()) : "(none)") +
                          " but " + util::shape_str(shape) + " was announced");
        }
        produced = encode(t.name, data, t.type);
      }
      const std::vector<uint8_t>& bytes = t.produce ? produced : t.bytes;
      os.write(reinterpret_cast<const char*>(bytes.data()),
               static_cast<std::streamsize>(bytes.size()));
      uint64_t pad = pad_to(bytes.size(), alignment_) - bytes.size();
      while (pad > 0) {
        const uint64_t n = std::min<uint64_t>(pad, sizeof zeros);
        os.write(zeros, static_cast<std::streamsize>(n));
        pad -= n;
      }
    }
  });
}

}  // namespace qlora::io
