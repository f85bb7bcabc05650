#include "qlora/io/gguf.h"

#include "io/name_hints.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <numeric>

#include "io/ggml_dequant.h"
#include "qlora/io/atomic_file.h"
#include "util/byte_cursor.h"
#include "util/strings.h"

// The format is little-endian and values are copied out verbatim.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "GGUF I/O assumes a little-endian host");

namespace qlora::io {
namespace {

constexpr char kMagic[4] = {'G', 'G', 'U', 'F'};
constexpr uint32_t kNewestVersion = 3;
constexpr uint64_t kDefaultAlignment = 32;
constexpr const char* kAlignmentKey = "general.alignment";
// ggml's GGML_MAX_NAME: names must be strictly shorter (they are stored
// NUL-terminated in a char[64]).
constexpr size_t kMaxNameBytes = 64;
constexpr uint32_t kMaxDims = 4;  // GGML_MAX_DIMS
// The smallest possible encodings, used to bound the header's counts by the
// bytes actually left before anything is allocated for them.
constexpr uint64_t kMinKvBytes = 8 + 1 + 4 + 1;  // key length, 1-byte key, type, 1-byte value
constexpr uint64_t kMinTensorInfoBytes =
    8 + 1 + 4 + 8 + 4 + 8;  // name, n_dims, ne[0], type, offset

// Quoted for messages: control bytes escaped (names come from the file and
// may be garbage), very long strings cut.
std::string quote(const std::string& s, size_t max_bytes = 200) {
  std::string out = "'";
  for (size_t i = 0; i < s.size() && i < max_bytes; ++i) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c == '\\' || c == '\'') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c < 0x20 || c == 0x7f) {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\x%02x", c);
      out += buf;
    } else {
      out += static_cast<char>(c);
    }
  }
  if (s.size() > max_bytes)
    out += "...' (" + std::to_string(s.size()) + " bytes)";
  else
    out += "'";
  return out;
}

std::string file_label(const std::string& path) { return "GGUF file " + quote(path); }

[[noreturn]] void fail(const std::string& path, const std::string& message) {
  throw GgufError(file_label(path) + ": " + message);
}

uint64_t pad_to(uint64_t n, uint64_t alignment) {
  return (n + alignment - 1) / alignment * alignment;
}

bool valid_gguf_type(int32_t raw) {
  return raw >= 0 && raw <= static_cast<int32_t>(GgufType::FLOAT64);
}

bool is_integer_type(GgufType type) {
  return gguf_scalar_bytes(type) != 0 && type != GgufType::BOOL && type != GgufType::FLOAT32 &&
         type != GgufType::FLOAT64;
}

constexpr GgmlTypeTraits kGgmlTypes[] = {
    {GgmlType::F32, "F32", 1, 4},       {GgmlType::F16, "F16", 1, 2},
    {GgmlType::Q4_0, "Q4_0", 32, 18},   {GgmlType::Q4_1, "Q4_1", 32, 20},
    {GgmlType::Q5_0, "Q5_0", 32, 22},   {GgmlType::Q5_1, "Q5_1", 32, 24},
    {GgmlType::Q8_0, "Q8_0", 32, 34},   {GgmlType::Q2_K, "Q2_K", 256, 84},
    {GgmlType::Q3_K, "Q3_K", 256, 110}, {GgmlType::Q4_K, "Q4_K", 256, 144},
    {GgmlType::Q5_K, "Q5_K", 256, 176}, {GgmlType::Q6_K, "Q6_K", 256, 210},
    {GgmlType::Q8_K, "Q8_K", 256, 292}, {GgmlType::BF16, "BF16", 1, 2},
};

// Names of the other ggml types (by number), so that a file using one is
// refused with a message saying which type it is.
std::string other_ggml_type_name(int32_t raw) {
  static const char* const kNames[] = {
      nullptr, nullptr,      nullptr,      nullptr,      "Q4_2",     "Q4_3",     nullptr,
      nullptr, nullptr,      "Q8_1",       nullptr,      nullptr,    nullptr,    nullptr,
      nullptr, nullptr,      "IQ2_XXS",    "IQ2_XS",     "IQ3_XXS",  "IQ1_S",    "IQ4_NL",
      "IQ3_S", "IQ2_S",      "IQ4_XS",     "I8",         "I16",      "I32",      "I64",
      "F64",   "IQ1_M",      nullptr,      "Q4_0_4_4",   "Q4_0_4_8", "Q4_0_8_8", "TQ1_0",
      "TQ2_0", "IQ4_NL_4_4", "IQ4_NL_4_8", "IQ4_NL_8_8", "MXFP4",    "NVFP4",    "Q1_0"};
  const auto n = static_cast<int32_t>(sizeof(kNames) / sizeof(kNames[0]));
  return raw >= 0 && raw < n && kNames[raw] != nullptr ? kNames[raw] : "";
}

std::string known_ggml_type_names() {
  std::string out;
  for (const GgmlTypeTraits& t : kGgmlTypes) out += (out.empty() ? "" : ", ") + std::string(t.name);
  return out;
}

std::string dequantizable_type_names() {
  std::string out;
  for (const GgmlTypeTraits& t : kGgmlTypes) {
    if (ggml_can_dequantize(t.type)) out += (out.empty() ? "" : ", ") + std::string(t.name);
  }
  return out;
}

// Where the shared cursor's errors go: GgufError naming the file.
struct FailIn {
  const std::string* path;
  [[noreturn]] void operator()(const std::string& message) const { fail(*path, message); }
};

// Reads the file front to back on the shared bounds-checked cursor; `what`
// (a callable returning a description) is only evaluated to build the error
// message. GGUF strings carry a u64 length.
class Cursor : public util::ByteCursor<FailIn> {
 public:
  explicit Cursor(const MappedFile& file)
      : ByteCursor(file.data(), file.size(), FailIn{&file.path()}), path_(file.path()) {}

  const std::string& path() const { return path_; }

  template <typename What>
  std::string read_string(const What& what) {
    const uint64_t n = read<uint64_t>([&] { return what() + " length"; });
    if (n > remaining()) {
      fail(path_, what() + " has length " + std::to_string(n) + " at offset " +
                      std::to_string(pos() - 8) + ", more than the " + std::to_string(remaining()) +
                      " bytes left in the file");
    }
    return ByteCursor::read_string(n, what);
  }

 private:
  const std::string& path_;
};

struct Header {
  uint32_t version;
  uint64_t n_tensors;
  uint64_t n_kv;
};

void check_magic(Cursor& in) {
  char magic[4];
  in.read_bytes(4, reinterpret_cast<uint8_t*>(magic), [] { return std::string("the magic"); });
  if (std::memcmp(magic, kMagic, 4) == 0) return;
  std::string shown;
  for (char c : magic) {
    char buf[8];
    std::snprintf(buf, sizeof(buf), "%s%02x", shown.empty() ? "" : " ",
                  static_cast<unsigned char>(c));
    shown += buf;
  }
  fail(in.path(), "not a GGUF file: starts with bytes " + shown + " (" +
                      quote(std::string(magic, 4)) + "), expected 'GGUF'");
}

void check_version(const std::string& path, uint32_t version) {
  if (version == 1) {
    fail(path,
         "GGUF version 1 is not supported (llama.cpp dropped it too); re-convert the model with "
         "a current llama.cpp");
  }
  if (version != 0 && (version & 0xFFFF) == 0) {
    fail(path, "GGUF version " + std::to_string(version) +
                   " looks byte-swapped: big-endian GGUF files are not supported");
  }
  if (version < 2 || version > kNewestVersion) {
    fail(path, "unsupported GGUF version " + std::to_string(version) +
                   " (this reader handles versions 2 and 3)");
  }
}

// Bounds a count from the header by what the rest of the file could hold.
void check_count(const Cursor& in, uint64_t count, uint64_t min_bytes, const char* what) {
  if (count > in.remaining() / min_bytes) {
    fail(in.path(),
         "header claims " + std::to_string(count) + " " + what + ", but the " +
             std::to_string(in.remaining()) + " bytes after the header can hold at most " +
             std::to_string(in.remaining() / min_bytes) + " (corrupt or truncated file?)");
  }
}

Header read_header(Cursor& in) {
  check_magic(in);
  Header h{};
  h.version = in.read<uint32_t>([] { return std::string("the header's version"); });
  check_version(in.path(), h.version);
  h.n_tensors = in.read<uint64_t>([] { return std::string("the header's tensor count"); });
  h.n_kv = in.read<uint64_t>([] { return std::string("the header's key/value count"); });
  check_count(in, h.n_kv, kMinKvBytes, "key/value pairs");
  check_count(in, h.n_tensors, kMinTensorInfoBytes, "tensors");
  if (h.n_kv * kMinKvBytes > in.remaining() - h.n_tensors * kMinTensorInfoBytes) {
    fail(in.path(), "header claims " + std::to_string(h.n_kv) + " key/value pairs and " +
                        std::to_string(h.n_tensors) + " tensors, more than the " +
                        std::to_string(in.remaining()) +
                        " bytes after the header can hold (corrupt or truncated file?)");
  }
  return h;
}

}  // namespace

// Builds GgufValues while parsing (the only code that sets their fields).
struct GgufValueAccess {
  static GgufValue parse(Cursor& in, const std::string& key);

 private:
  static void read_scalar(Cursor& in, GgufValue* v);
  static void read_array(Cursor& in, GgufValue* v);
  static void check_bools(const Cursor& in, const GgufValue& v);
};

void GgufValueAccess::check_bools(const Cursor& in, const GgufValue& v) {
  for (size_t i = 0; i < v.bytes_.size(); ++i) {
    if (v.bytes_[i] > 1) {
      fail(in.path(), "key " + quote(v.key_) + ": BOOL " +
                          (v.is_array() ? "element " + std::to_string(i) + " " : std::string()) +
                          "holds the byte " + std::to_string(v.bytes_[i]) + ", expected 0 or 1");
    }
  }
}

void GgufValueAccess::read_scalar(Cursor& in, GgufValue* v) {
  const auto what = [&] {
    return "the " + gguf_type_name(v->type_) + " value of key " + quote(v->key_);
  };
  if (v->type_ == GgufType::STRING) {
    v->strings_.push_back(in.read_string(what));
    return;
  }
  v->bytes_.resize(gguf_scalar_bytes(v->type_));
  in.read_bytes(v->bytes_.size(), v->bytes_.data(), what);
  if (v->type_ == GgufType::BOOL) check_bools(in, *v);
}

void GgufValueAccess::read_array(Cursor& in, GgufValue* v) {
  const std::string& key = v->key_;
  const auto raw = in.read<int32_t>([&] { return "the array element type of key " + quote(key); });
  v->count_ = in.read<uint64_t>([&] { return "the array length of key " + quote(key); });
  if (raw == static_cast<int32_t>(GgufType::ARRAY)) {
    fail(in.path(), "key " + quote(key) + " is an array of arrays; GGUF does not allow nesting");
  }
  if (!valid_gguf_type(raw)) {
    fail(in.path(), "key " + quote(key) + " is an array of invalid value type " +
                        std::to_string(raw) + " (valid: 0 to 12)");
  }
  v->element_type_ = static_cast<GgufType>(raw);
  // Strings take at least their 8-byte length each.
  const uint64_t min_bytes =
      v->element_type_ == GgufType::STRING ? 8 : gguf_scalar_bytes(v->element_type_);
  if (v->count_ > in.remaining() / min_bytes) {
    fail(in.path(), "key " + quote(key) + " claims " + std::to_string(v->count_) + " elements of " +
                        gguf_type_name(v->element_type_) + " (at least " +
                        std::to_string(min_bytes) + " bytes each), more than the " +
                        std::to_string(in.remaining()) + " bytes left in the file");
  }
  if (v->element_type_ == GgufType::STRING) {
    // No reserve(): the count is bounded but not yet proven; growth follows
    // the strings actually read.
    for (uint64_t i = 0; i < v->count_; ++i) {
      v->strings_.push_back(in.read_string(
          [&] { return "element " + std::to_string(i) + " of string array " + quote(key); }));
    }
    return;
  }
  v->bytes_.resize(v->count_ * min_bytes);
  in.read_bytes(v->bytes_.size(), v->bytes_.data(), [&] { return "the array " + quote(key); });
  if (v->element_type_ == GgufType::BOOL) check_bools(in, *v);
}

GgufValue GgufValueAccess::parse(Cursor& in, const std::string& key) {
  GgufValue v;
  v.file_ = file_label(in.path());
  v.key_ = key;
  const auto raw = in.read<int32_t>([&] { return "the value type of key " + quote(key); });
  if (!valid_gguf_type(raw)) {
    fail(in.path(), "key " + quote(key) + " has invalid value type " + std::to_string(raw) +
                        " (valid: 0 to 12)");
  }
  v.type_ = static_cast<GgufType>(raw);
  v.element_type_ = v.type_;
  if (v.is_array()) {
    read_array(in, &v);
  } else {
    read_scalar(in, &v);
  }
  return v;
}

namespace {

void read_key_values(Cursor& in, uint64_t n_kv, std::vector<std::string>* keys,
                     std::unordered_map<std::string, GgufValue>* values) {
  for (uint64_t i = 0; i < n_kv; ++i) {
    std::string key = in.read_string([&] { return "key #" + std::to_string(i); });
    if (key.empty()) fail(in.path(), "key #" + std::to_string(i) + " is empty");
    if (values->count(key) != 0) {
      const size_t first = std::find(keys->begin(), keys->end(), key) - keys->begin();
      fail(in.path(), "key " + quote(key) + " appears twice (entries #" + std::to_string(first) +
                          " and #" + std::to_string(i) + ")");
    }
    GgufValue value = GgufValueAccess::parse(in, key);
    values->emplace(key, std::move(value));
    keys->push_back(std::move(key));
  }
}

uint64_t read_alignment(const std::string& path,
                        const std::unordered_map<std::string, GgufValue>& values) {
  const auto it = values.find(kAlignmentKey);
  if (it == values.end()) return kDefaultAlignment;
  const GgufValue& v = it->second;
  if (v.type() != GgufType::UINT32) {
    fail(path, std::string("key '") + kAlignmentKey + "' must be UINT32, got " +
                   (v.is_array() ? "ARRAY of " + gguf_type_name(v.element_type())
                                 : gguf_type_name(v.type())));
  }
  const uint32_t a = v.get_u32();
  if (a == 0 || (a & (a - 1)) != 0) {
    fail(path, std::string("key '") + kAlignmentKey + "' is " + std::to_string(a) +
                   ", not a power of two");
  }
  return a;
}

std::vector<int64_t> read_dims(Cursor& in, const std::string& name) {
  const auto n_dims =
      in.read<uint32_t>([&] { return "the dimension count of tensor " + quote(name); });
  if (n_dims == 0 || n_dims > kMaxDims) {
    fail(in.path(), "tensor " + quote(name) + " has " + std::to_string(n_dims) +
                        " dimensions; ggml allows 1 to 4");
  }
  std::vector<int64_t> ne(n_dims);
  int64_t numel = 1;
  for (uint32_t d = 0; d < n_dims; ++d) {
    ne[d] = in.read<int64_t>(
        [&] { return "dimension " + std::to_string(d) + " of tensor " + quote(name); });
    if (ne[d] < 0) {
      fail(in.path(), "tensor " + quote(name) + " has negative ne[" + std::to_string(d) +
                          "] = " + std::to_string(ne[d]));
    }
  }
  for (int64_t n : ne) {
    if (__builtin_mul_overflow(numel, n, &numel)) {
      fail(in.path(), "tensor " + quote(name) + " has ne " + util::shape_str(ne) +
                          ", more elements than fit in int64");
    }
  }
  return ne;
}

const GgmlTypeTraits& read_ggml_type(Cursor& in, const std::string& name) {
  const auto raw = in.read<int32_t>([&] { return "the ggml type of tensor " + quote(name); });
  const GgmlTypeTraits* traits = find_ggml_type(raw);
  if (traits == nullptr) {
    const std::string other = other_ggml_type_name(raw);
    fail(in.path(),
         "tensor " + quote(name) + " has ggml type " + std::to_string(raw) +
             (other.empty() ? " (unknown)" : " (" + other + ")") +
             ", which this reader does not support (supported: " + known_ggml_type_names() + ")");
  }
  return *traits;
}

// ne[0] must be whole blocks; returns the byte size (checked for overflow).
uint64_t tensor_nbytes(const std::string& path, const GgufTensorInfo& t,
                       const GgmlTypeTraits& traits) {
  if (t.ne[0] % traits.block_size != 0) {
    fail(path, "tensor " + quote(t.name) + " of type " + traits.name +
                   " has ne[0] = " + std::to_string(t.ne[0]) +
                   " elements per row, not a multiple of the block size " +
                   std::to_string(traits.block_size));
  }
  // The raw view has ne[0] / block_size * type_size bytes per row, an int64 dimension even
  // when another dimension is 0 and the tensor holds no bytes at all.
  int64_t row_bytes = 0;
  if (__builtin_mul_overflow(t.ne[0] / traits.block_size, static_cast<int64_t>(traits.type_size),
                             &row_bytes)) {
    fail(path, "tensor " + quote(t.name) + " with ne " + util::shape_str(t.ne) +
                   " has rows of more bytes than fit in 63 bits");
  }
  uint64_t nbytes = static_cast<uint64_t>(t.numel() / traits.block_size);
  if (__builtin_mul_overflow(nbytes, static_cast<uint64_t>(traits.type_size), &nbytes)) {
    fail(path, "tensor " + quote(t.name) + " with ne " + util::shape_str(t.ne) +
                   " has more bytes than fit in 64 bits");
  }
  return nbytes;
}

GgufTensorInfo read_tensor_info(Cursor& in, uint64_t index) {
  GgufTensorInfo t;
  t.name = in.read_string([&] { return "the name of tensor #" + std::to_string(index); });
  if (t.name.empty()) fail(in.path(), "tensor #" + std::to_string(index) + " has an empty name");
  if (t.name.size() >= kMaxNameBytes) {
    fail(in.path(), "tensor #" + std::to_string(index) + " name " + quote(t.name) + " is " +
                        std::to_string(t.name.size()) + " bytes; ggml allows at most " +
                        std::to_string(kMaxNameBytes - 1));
  }
  t.ne = read_dims(in, t.name);
  const GgmlTypeTraits& traits = read_ggml_type(in, t.name);
  t.type = traits.type;
  t.nbytes = tensor_nbytes(in.path(), t, traits);
  t.offset = in.read<uint64_t>([&] { return "the data offset of tensor " + quote(t.name); });
  return t;
}

std::string byte_range(uint64_t begin, uint64_t nbytes) {
  return "[" + std::to_string(begin) + ", " + std::to_string(begin + nbytes) + ")";
}

// Alignment, bounds and (strict) llama.cpp's back-to-back order.
void check_offsets(const std::string& path, const std::vector<GgufTensorInfo>& tensors,
                   uint64_t alignment, uint64_t data_offset, uint64_t data_size, bool strict) {
  uint64_t expected = 0;
  for (const GgufTensorInfo& t : tensors) {
    if (t.offset % alignment != 0) {
      fail(path, "tensor " + quote(t.name) + " has data offset " + std::to_string(t.offset) +
                     ", not a multiple of the alignment " + std::to_string(alignment));
    }
    if (strict && t.offset != expected) {
      fail(path, "tensor " + quote(t.name) + " has data offset " + std::to_string(t.offset) +
                     ", expected " + std::to_string(expected) +
                     ": llama.cpp requires the tensors back to back in info order, each padded "
                     "to the alignment of " +
                     std::to_string(alignment) +
                     " bytes (open with strict_offsets = false to read this file anyway)");
    }
    if (t.offset > data_size || t.nbytes > data_size - t.offset) {
      fail(path, "tensor " + quote(t.name) + " (" + std::to_string(t.nbytes) +
                     " bytes at data offset " + std::to_string(t.offset) + ", file offset " +
                     std::to_string(data_offset + t.offset) +
                     ") extends past the end of the file, whose data section has " +
                     std::to_string(data_size) + " bytes (truncated file?)");
    }
    expected = t.offset + pad_to(t.nbytes, alignment);  // cannot overflow: in bounds above
  }
}

// Without the back-to-back rule, tensors may lie in any order but must not
// share bytes (a write through one would change another).
void check_no_overlap(const std::string& path, const std::vector<GgufTensorInfo>& tensors) {
  std::vector<const GgufTensorInfo*> by_offset;
  for (const GgufTensorInfo& t : tensors) {
    if (t.nbytes > 0) by_offset.push_back(&t);
  }
  // Stable: of two tensors at one offset, the later in info order is blamed.
  std::stable_sort(
      by_offset.begin(), by_offset.end(),
      [](const GgufTensorInfo* a, const GgufTensorInfo* b) { return a->offset < b->offset; });
  for (size_t i = 1; i < by_offset.size(); ++i) {
    const GgufTensorInfo& prev = *by_offset[i - 1];
    const GgufTensorInfo& t = *by_offset[i];
    if (t.offset < prev.offset + prev.nbytes) {
      fail(path, "tensor " + quote(t.name) + " at data bytes " + byte_range(t.offset, t.nbytes) +
                     " overlaps tensor " + quote(prev.name) + " at " +
                     byte_range(prev.offset, prev.nbytes));
    }
  }
}

}  // namespace

// ---------------------------------------------------------------- types

uint64_t gguf_scalar_bytes(GgufType type) {
  switch (type) {
    case GgufType::UINT8:
    case GgufType::INT8:
    case GgufType::BOOL:
      return 1;
    case GgufType::UINT16:
    case GgufType::INT16:
      return 2;
    case GgufType::UINT32:
    case GgufType::INT32:
    case GgufType::FLOAT32:
      return 4;
    case GgufType::UINT64:
    case GgufType::INT64:
    case GgufType::FLOAT64:
      return 8;
    default:
      return 0;
  }
}

std::string gguf_type_name(GgufType type) {
  static const char* const kNames[] = {"UINT8",  "INT8",    "UINT16", "INT16",  "UINT32",
                                       "INT32",  "FLOAT32", "BOOL",   "STRING", "ARRAY",
                                       "UINT64", "INT64",   "FLOAT64"};
  const auto raw = static_cast<int32_t>(type);
  return valid_gguf_type(raw) ? kNames[raw] : "invalid type " + std::to_string(raw);
}

const GgmlTypeTraits* find_ggml_type(int32_t raw) {
  for (const GgmlTypeTraits& t : kGgmlTypes) {
    if (static_cast<int32_t>(t.type) == raw) return &t;
  }
  return nullptr;
}

const GgmlTypeTraits& ggml_type_traits(GgmlType type) {
  const GgmlTypeTraits* t = find_ggml_type(static_cast<int32_t>(type));
  if (t == nullptr) {
    throw GgufError("unknown ggml type " + std::to_string(static_cast<int32_t>(type)) +
                    " (known: " + known_ggml_type_names() + ")");
  }
  return *t;
}

std::string ggml_type_name(GgmlType type) {
  const GgmlTypeTraits* t = find_ggml_type(static_cast<int32_t>(type));
  return t != nullptr ? t->name : "unknown ggml type " + std::to_string(static_cast<int32_t>(type));
}

// ---------------------------------------------------------------- GgufValue

std::string GgufValue::type_str() const {
  return is_array() ? "ARRAY of " + gguf_type_name(element_type_) : gguf_type_name(type_);
}

void GgufValue::wrong_type(const std::string& expected) const {
  throw GgufError(file_ + ": key " + quote(key_) + " is " + type_str() + ", expected " + expected);
}

void GgufValue::expect_scalar(GgufType type) const {
  if (type_ != type) wrong_type(gguf_type_name(type));
}

void GgufValue::expect_array(GgufType element) const {
  if (!is_array() || element_type_ != element) wrong_type("ARRAY of " + gguf_type_name(element));
}

namespace {

template <typename T>
T load(const std::vector<uint8_t>& bytes, size_t i = 0) {
  T v;
  std::memcpy(&v, bytes.data() + i * sizeof(T), sizeof(T));
  return v;
}

// The integer at position i of a scalar payload of integer `type`, or false
// for a UINT64 beyond int64.
bool load_int(GgufType type, const std::vector<uint8_t>& bytes, size_t i, int64_t* out) {
  switch (type) {
    case GgufType::UINT8:
      *out = load<uint8_t>(bytes, i);
      return true;
    case GgufType::INT8:
      *out = load<int8_t>(bytes, i);
      return true;
    case GgufType::UINT16:
      *out = load<uint16_t>(bytes, i);
      return true;
    case GgufType::INT16:
      *out = load<int16_t>(bytes, i);
      return true;
    case GgufType::UINT32:
      *out = load<uint32_t>(bytes, i);
      return true;
    case GgufType::INT32:
      *out = load<int32_t>(bytes, i);
      return true;
    case GgufType::INT64:
      *out = load<int64_t>(bytes, i);
      return true;
    case GgufType::UINT64: {
      const auto u = load<uint64_t>(bytes, i);
      *out = static_cast<int64_t>(u);
      return u <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
    }
    default:
      return false;
  }
}

std::string format_float(double v, int digits) {
  char buf[40];
  std::snprintf(buf, sizeof(buf), "%.*g", digits, v);
  return buf;
}

// Double-quoted, with quotes, backslashes and control bytes escaped;
// UTF-8 bytes are kept.
std::string quote_value(const std::string& s) {
  std::string out = "\"";
  for (const char ch : s) {
    const auto c = static_cast<unsigned char>(ch);
    if (c == '"' || c == '\\') {
      out += '\\';
      out += ch;
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\t') {
      out += "\\t";
    } else if (c < 0x20 || c == 0x7f) {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\x%02x", c);
      out += buf;
    } else {
      out += ch;
    }
  }
  return out + "\"";
}

}  // namespace

uint8_t GgufValue::get_u8() const {
  expect_scalar(GgufType::UINT8);
  return load<uint8_t>(bytes_);
}
int8_t GgufValue::get_i8() const {
  expect_scalar(GgufType::INT8);
  return load<int8_t>(bytes_);
}
uint16_t GgufValue::get_u16() const {
  expect_scalar(GgufType::UINT16);
  return load<uint16_t>(bytes_);
}
int16_t GgufValue::get_i16() const {
  expect_scalar(GgufType::INT16);
  return load<int16_t>(bytes_);
}
uint32_t GgufValue::get_u32() const {
  expect_scalar(GgufType::UINT32);
  return load<uint32_t>(bytes_);
}
int32_t GgufValue::get_i32() const {
  expect_scalar(GgufType::INT32);
  return load<int32_t>(bytes_);
}
uint64_t GgufValue::get_u64() const {
  expect_scalar(GgufType::UINT64);
  return load<uint64_t>(bytes_);
}
int64_t GgufValue::get_i64() const {
  expect_scalar(GgufType::INT64);
  return load<int64_t>(bytes_);
}
float GgufValue::get_f32() const {
  expect_scalar(GgufType::FLOAT32);
  return load<float>(bytes_);
}
double GgufValue::get_f64() const {
  expect_scalar(GgufType::FLOAT64);
  return load<double>(bytes_);
}
bool GgufValue::get_bool() const {
  expect_scalar(GgufType::BOOL);
  return bytes_[0] != 0;
}
const std::string& GgufValue::get_string() const {
  expect_scalar(GgufType::STRING);
  return strings_[0];
}

int64_t GgufValue::get_int() const {
  if (is_array() || !is_integer_type(type_)) wrong_type("an integer type");
  int64_t v = 0;
  if (!load_int(type_, bytes_, 0, &v)) {
    throw GgufError(file_ + ": key " + quote(key_) + " is UINT64 " +
                    std::to_string(load<uint64_t>(bytes_)) + ", too large for int64");
  }
  return v;
}

const std::vector<std::string>& GgufValue::get_string_array() const {
  expect_array(GgufType::STRING);
  return strings_;
}

std::vector<float> GgufValue::get_f32_array() const {
  expect_array(GgufType::FLOAT32);
  std::vector<float> out(count_);
  if (count_ > 0) std::memcpy(out.data(), bytes_.data(), bytes_.size());
  return out;
}

std::vector<int32_t> GgufValue::get_i32_array() const {
  expect_array(GgufType::INT32);
  std::vector<int32_t> out(count_);
  if (count_ > 0) std::memcpy(out.data(), bytes_.data(), bytes_.size());
  return out;
}

std::vector<int64_t> GgufValue::get_int_array() const {
  if (!is_array() || !is_integer_type(element_type_)) wrong_type("an ARRAY of an integer type");
  std::vector<int64_t> out(count_);
  for (size_t i = 0; i < out.size(); ++i) {
    if (!load_int(element_type_, bytes_, i, &out[i])) {
      throw GgufError(file_ + ": key " + quote(key_) + " element " + std::to_string(i) +
                      " is UINT64 " + std::to_string(load<uint64_t>(bytes_, i)) +
                      ", too large for int64");
    }
  }
  return out;
}

std::string GgufValue::element_str(size_t i) const {
  switch (element_type_) {
    case GgufType::STRING:
      return quote_value(strings_[i]);
    case GgufType::BOOL:
      return bytes_[i] != 0 ? "true" : "false";
    case GgufType::FLOAT32:
      return format_float(load<float>(bytes_, i), 9);
    case GgufType::FLOAT64:
      return format_float(load<double>(bytes_, i), 17);
    case GgufType::UINT64:
      return std::to_string(load<uint64_t>(bytes_, i));
    default: {
      int64_t v = 0;
      load_int(element_type_, bytes_, i, &v);
      return std::to_string(v);
    }
  }
}

std::string GgufValue::to_string(size_t max_elements) const {
  if (!is_array()) return element_str(0);
  std::string out = "[";
  for (uint64_t i = 0; i < count_ && i < max_elements; ++i) {
    out += (i > 0 ? ", " : "") + element_str(i);
  }
  if (count_ > max_elements) out += ", ...";
  return out + "]";
}

// ---------------------------------------------------------------- tensors

std::vector<int64_t> GgufTensorInfo::torch_shape() const { return {ne.rbegin(), ne.rend()}; }

int64_t GgufTensorInfo::numel() const {
  return std::accumulate(ne.begin(), ne.end(), int64_t{1}, std::multiplies<int64_t>());
}

// ---------------------------------------------------------------- reader

GgufReader GgufReader::open(const std::string& path, const GgufOpenOptions& options) {
  GgufReader reader;
  reader.file_ = std::make_shared<const MappedFile>(path);
  Cursor in(*reader.file_);
  const Header header = read_header(in);
  reader.version_ = header.version;
  read_key_values(in, header.n_kv, &reader.keys_, &reader.values_);
  reader.alignment_ = read_alignment(path, reader.values_);

  for (uint64_t i = 0; i < header.n_tensors; ++i) {
    GgufTensorInfo t = read_tensor_info(in, i);
    const auto [it, inserted] = reader.tensor_index_.emplace(t.name, reader.tensors_.size());
    if (!inserted) {
      fail(path, "tensor name " + quote(t.name) + " appears twice (tensors #" +
                     std::to_string(it->second) + " and #" + std::to_string(i) + ")");
    }
    reader.tensors_.push_back(std::move(t));
  }

  // As llama.cpp: the data section starts at the next multiple of the
  // alignment (only when there are tensors to align).
  reader.data_offset_ = header.n_tensors > 0 ? pad_to(in.pos(), reader.alignment_) : in.pos();
  const uint64_t file_size = reader.file_->size();
  if (reader.data_offset_ > file_size) {
    fail(path, "the data section should start at byte " + std::to_string(reader.data_offset_) +
                   " (end of the tensor infos padded to the alignment of " +
                   std::to_string(reader.alignment_) + "), past the end of the " +
                   std::to_string(file_size) + "-byte file (truncated file?)");
  }
  const uint64_t data_size = file_size - reader.data_offset_;
  check_offsets(path, reader.tensors_, reader.alignment_, reader.data_offset_, data_size,
                options.strict_offsets);
  if (!options.strict_offsets) check_no_overlap(path, reader.tensors_);
  return reader;
}

const std::string& GgufReader::path() const { return file_->path(); }

const GgufValue& GgufReader::get(const std::string& key) const {
  const auto it = values_.find(key);
  if (it == values_.end()) fail(path(), "no key " + quote(key) + close_names_hint(key, keys_));
  return it->second;
}

const GgufTensorInfo& GgufReader::tensor_info(const std::string& name) const {
  const auto it = tensor_index_.find(name);
  if (it == tensor_index_.end()) {
    std::vector<std::string> names;
    names.reserve(tensors_.size());
    for (const GgufTensorInfo& t : tensors_) names.push_back(t.name);
    fail(path(), "no tensor " + quote(name) + close_names_hint(name, names));
  }
  return tensors_[it->second];
}

const uint8_t* GgufReader::tensor_data(const std::string& name) const {
  return file_->data() + data_offset_ + tensor_info(name).offset;
}

at::Tensor GgufReader::raw(const std::string& name) const {
  const GgufTensorInfo& t = tensor_info(name);
  const GgmlTypeTraits& traits = ggml_type_traits(t.type);
  std::vector<int64_t> shape = t.torch_shape();
  shape.back() = shape.back() / traits.block_size * traits.type_size;
  const auto options = at::TensorOptions().dtype(at::kByte).device(at::kCPU);
  // Empty tensors own no bytes of the file (and may sit at its very end).
  if (t.nbytes == 0) return at::empty(shape, options);
  uint8_t* src = file_->mutable_data() + data_offset_ + t.offset;
  return at::from_blob(
      src, shape, [file = file_](void*) {}, options);
}

void GgufReader::release(const std::string& name) const {
  const GgufTensorInfo& t = tensor_info(name);
  file_->drop_pages(data_offset_ + t.offset, t.nbytes);
}

at::Tensor GgufReader::dequantize(const std::string& name, at::ScalarType dtype) const {
  const GgufTensorInfo& t = tensor_info(name);
  if (!at::isFloatingType(dtype)) {
    fail(path(), "tensor " + quote(name) + ": cannot dequantize to " + c10::toString(dtype) +
                     ", which is not a floating-point dtype");
  }
  if (!ggml_can_dequantize(t.type)) {
    fail(path(), "tensor " + quote(name) + " has ggml type " + ggml_type_name(t.type) +
                     ", which cannot be dequantized (supported: " + dequantizable_type_names() +
                     ")");
  }
  at::Tensor out = at::empty(t.torch_shape(), at::TensorOptions().dtype(at::kFloat));
  if (t.nbytes > 0) {
    detail::dequantize_ggml(t.type, file_->data() + data_offset_ + t.offset, t.numel(),
                            out.mutable_data_ptr<float>());
  }
  return dtype == at::kFloat ? out : out.to(dtype);
}

}  // namespace qlora::io
