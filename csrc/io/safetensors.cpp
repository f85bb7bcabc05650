#include "qlora/io/safetensors.h"

#include "io/name_hints.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>

#include <sys/stat.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstring>
#include <ostream>
#include <set>

#include "qlora/io/atomic_file.h"
#include "util/strings.h"

// The format stores little-endian bytes and we copy them verbatim.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "safetensors I/O assumes a little-endian host");

namespace qlora::io {
namespace {

using nlohmann::json;

constexpr const char* kMetadataKey = "__metadata__";
// safetensors' own limit (MAX_HEADER_SIZE); a bigger length is corruption or
// an attempt to make us allocate without bound.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;
// Far deeper than any real header or index; only bounds pathological input.
constexpr int kMaxJsonDepth = 64;

struct DtypeEntry {
  const char* name;
  at::ScalarType type;
};

// In the order of safetensors' Rust `Dtype` enum: save_file writes tensors
// by descending position here (largest alignment first), then by name, and
// so must we to produce identical files. F4, F6_* and F8_E8M0 are left out
// because safetensors.torch cannot load them.
constexpr DtypeEntry kDtypes[] = {
    {"BOOL", at::kBool},
    {"U8", at::kByte},
    {"I8", at::kChar},
    {"F8_E5M2", at::kFloat8_e5m2},
    {"F8_E4M3", at::kFloat8_e4m3fn},
    {"F8_E4M3FNUZ", at::kFloat8_e4m3fnuz},
    {"F8_E5M2FNUZ", at::kFloat8_e5m2fnuz},
    {"I16", at::kShort},
    {"U16", at::kUInt16},
    {"F16", at::kHalf},
    {"BF16", at::kBFloat16},
    {"I32", at::kInt},
    {"U32", at::kUInt32},
    {"F32", at::kFloat},
    {"C64", at::kComplexFloat},
    {"F64", at::kDouble},
    {"I64", at::kLong},
    {"U64", at::kUInt64},
};

const DtypeEntry* find_dtype(const std::string& name) {
  for (const DtypeEntry& d : kDtypes) {
    if (name == d.name) return &d;
  }
  return nullptr;
}

const DtypeEntry* find_dtype(at::ScalarType type) {
  for (const DtypeEntry& d : kDtypes) {
    if (type == d.type) return &d;
  }
  return nullptr;
}

int dtype_rank(const DtypeEntry* d) { return static_cast<int>(d - kDtypes); }

std::string supported_dtype_names() {
  std::string out;
  for (const DtypeEntry& d : kDtypes) {
    if (!out.empty()) out += ", ";
    out += d.name;
  }
  return out;
}

std::string range_str(uint64_t begin, uint64_t end) {
  return "[" + std::to_string(begin) + ", " + std::to_string(end) + "]";
}

std::string in_quotes(const std::string& s) { return "'" + s + "'"; }

[[noreturn]] void fail(const std::string& path, const std::string& message) {
  throw SafetensorsError("safetensors file " + in_quotes(path) + ": " + message);
}

[[noreturn]] void fail_tensor(const std::string& path, const std::string& name,
                              const std::string& message) {
  fail(path, "tensor " + in_quotes(name) + ": " + message);
}

using util::ends_with;
using util::shape_str;

// Parses JSON, rejecting duplicate keys in any object (nlohmann would keep
// the last one silently, so a file could show different tensors to
// different readers) and absurd nesting. `what` starts every error message,
// e.g. "safetensors file 'x': header".
json parse_json_strict(const char* data, size_t size, const std::string& what) {
  // nlohmann stops at a NUL byte as if the input ended there, so without this
  // check "{}\0<anything>" would parse as "{}". JSON text never holds a raw NUL.
  const void* nul = std::memchr(data, '\0', size);
  if (nul != nullptr) {
    throw SafetensorsError(what + " is not valid JSON: NUL byte at offset " +
                           std::to_string(static_cast<const char*>(nul) - data));
  }
  std::vector<std::set<std::string>> open_objects;
  const json::parser_callback_t check = [&](int depth, json::parse_event_t event, json& parsed) {
    if (depth > kMaxJsonDepth) {
      throw SafetensorsError(what + " nests deeper than " + std::to_string(kMaxJsonDepth) +
                             " levels");
    }
    if (event == json::parse_event_t::object_start) {
      open_objects.emplace_back();
    } else if (event == json::parse_event_t::object_end) {
      open_objects.pop_back();
    } else if (event == json::parse_event_t::key) {
      const std::string& key = parsed.get_ref<const std::string&>();
      if (!open_objects.back().insert(key).second) {
        throw SafetensorsError(what + " has the key " + in_quotes(key) + " twice");
      }
    }
    return true;
  };
  try {
    return json::parse(data, data + size, check);
  } catch (const json::exception& e) {  // parse_error, or out_of_range for numbers like 1e999
    throw SafetensorsError(what + " is not valid JSON: " + e.what());
  }
}

uint64_t read_u64_le(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

std::vector<int64_t> parse_shape(const std::string& path, const std::string& name, const json& j) {
  if (!j.is_array()) {
    fail_tensor(path, name, "\"shape\" must be an array of non-negative integers, got " + j.dump());
  }
  std::vector<int64_t> shape;
  shape.reserve(j.size());
  for (const json& dim : j) {
    if (dim.is_number_integer() && !dim.is_number_unsigned()) {
      fail_tensor(path, name, "\"shape\" " + j.dump() + " has negative dimension " + dim.dump());
    }
    if (!dim.is_number_unsigned()) {
      fail_tensor(path, name,
                  "\"shape\" must be an array of non-negative integers, got " + j.dump());
    }
    const uint64_t d = dim.get<uint64_t>();
    if (d > static_cast<uint64_t>(INT64_MAX)) {
      fail_tensor(path, name, "\"shape\" dimension " + dim.dump() + " does not fit in int64");
    }
    shape.push_back(static_cast<int64_t>(d));
  }
  return shape;
}

std::pair<uint64_t, uint64_t> parse_offsets(const std::string& path, const std::string& name,
                                            const json& j) {
  if (!j.is_array() || j.size() != 2 || !j[0].is_number_unsigned() || !j[1].is_number_unsigned()) {
    fail_tensor(
        path, name,
        "\"data_offsets\" must be [begin, end] of two non-negative integers, got " + j.dump());
  }
  const uint64_t begin = j[0].get<uint64_t>();
  const uint64_t end = j[1].get<uint64_t>();
  if (begin > end) {
    fail_tensor(path, name, "\"data_offsets\" " + range_str(begin, end) + " has begin > end");
  }
  return {begin, end};
}

// numel * element size, or false when that overflows 64 bits.
bool checked_nbytes(const std::vector<int64_t>& shape, at::ScalarType dtype, uint64_t* nbytes) {
  uint64_t n = c10::elementSize(dtype);
  for (int64_t d : shape) {
    if (__builtin_mul_overflow(n, static_cast<uint64_t>(d), &n)) return false;
  }
  *nbytes = n;
  return true;
}

const json& required_field(const std::string& path, const std::string& name, const json& entry,
                           const char* field) {
  const auto it = entry.find(field);
  if (it == entry.end()) {
    fail_tensor(path, name, std::string("missing \"") + field + "\" (entry: " + entry.dump() + ")");
  }
  return *it;
}

TensorInfo parse_tensor_entry(const std::string& path, const std::string& name, const json& entry,
                              uint64_t data_size) {
  if (!entry.is_object()) {
    fail_tensor(path, name,
                "entry must be an object with dtype, shape and data_offsets, got " + entry.dump());
  }
  const json& dtype_json = required_field(path, name, entry, "dtype");
  const json& shape_json = required_field(path, name, entry, "shape");
  const json& offsets_json = required_field(path, name, entry, "data_offsets");
  if (!dtype_json.is_string()) {
    fail_tensor(path, name, "\"dtype\" must be a string, got " + dtype_json.dump());
  }
  const DtypeEntry* dtype = find_dtype(dtype_json.get_ref<const std::string&>());
  if (dtype == nullptr) {
    fail_tensor(
        path, name,
        "unknown dtype " + dtype_json.dump() + " (supported: " + supported_dtype_names() + ")");
  }

  TensorInfo info;
  info.name = name;
  info.dtype = dtype->type;
  info.shape = parse_shape(path, name, shape_json);
  std::tie(info.begin, info.end) = parse_offsets(path, name, offsets_json);
  if (info.end > data_size) {
    fail_tensor(path, name,
                "\"data_offsets\" " + range_str(info.begin, info.end) +
                    " end beyond the data section of " + std::to_string(data_size) +
                    " bytes (truncated file?)");
  }
  uint64_t expected = 0;
  if (!checked_nbytes(info.shape, info.dtype, &expected)) {
    fail_tensor(
        path, name,
        "shape " + shape_str(info.shape) + " of " + dtype->name + " overflows 64-bit sizes");
  }
  if (info.end - info.begin != expected) {
    fail_tensor(path, name,
                "\"data_offsets\" " + range_str(info.begin, info.end) + " span " +
                    std::to_string(info.end - info.begin) + " bytes but shape " +
                    shape_str(info.shape) + " of " + dtype->name + " needs " +
                    std::to_string(expected) + " bytes");
  }
  return info;
}

std::map<std::string, std::string> parse_metadata(const std::string& path, const json& j) {
  std::map<std::string, std::string> metadata;
  if (j.is_null()) return metadata;  // safetensors reads null as "no metadata"
  if (!j.is_object()) {
    fail(path,
         std::string("\"") + kMetadataKey + "\" must be an object of strings, got " + j.dump());
  }
  for (const auto& [key, value] : j.items()) {
    if (!value.is_string()) {
      fail(path, std::string("\"") + kMetadataKey + "\" value for key " + in_quotes(key) +
                     " must be a string, got " + value.dump());
    }
    metadata.emplace(key, value.get<std::string>());
  }
  return metadata;
}

// Sorts by offset and requires the tensors to tile the data section exactly,
// as safetensors does: no overlaps (one tensor's bytes aliasing another's),
// no gaps and no trailing bytes (both would hide unvalidated data).
void check_tiling(const std::string& path, std::vector<TensorInfo>* tensors, uint64_t data_size) {
  std::stable_sort(tensors->begin(), tensors->end(), [](const TensorInfo& a, const TensorInfo& b) {
    return std::tie(a.begin, a.end) < std::tie(b.begin, b.end);
  });
  uint64_t covered = 0;
  const TensorInfo* previous = nullptr;
  for (const TensorInfo& t : *tensors) {
    if (t.begin < covered) {
      fail_tensor(path, t.name,
                  "bytes " + range_str(t.begin, t.end) + " overlap tensor " +
                      in_quotes(previous->name) + " at " +
                      range_str(previous->begin, previous->end));
    }
    if (t.begin > covered) {
      const std::string after = previous == nullptr
                                    ? "the start of the data section"
                                    : "tensor " + in_quotes(previous->name) + " ending at " +
                                          std::to_string(previous->end);
      fail_tensor(path, t.name,
                  "starts at byte " + std::to_string(t.begin) + ", leaving a gap of " +
                      std::to_string(t.begin - covered) + " bytes after " + after +
                      " (tensors must be packed back to back)");
    }
    covered = t.end;
    previous = &t;
  }
  if (covered != data_size) {
    fail(path, "the data section has " + std::to_string(data_size) +
                   " bytes but the tensors cover " + std::to_string(covered) +
                   " (trailing bytes are not allowed)");
  }
}

// Returns the header length after checking it against the file size.
uint64_t read_header_length(const MappedFile& file) {
  constexpr uint64_t kPrefix = sizeof(uint64_t);
  if (file.size() < kPrefix) {
    fail(file.path(), "file is " + std::to_string(file.size()) +
                          " bytes, shorter than the 8-byte header length prefix");
  }
  const uint64_t n = read_u64_le(file.data());
  if (n > kMaxHeaderBytes) {
    fail(file.path(), "header length " + std::to_string(n) + " exceeds the limit of " +
                          std::to_string(kMaxHeaderBytes) + " bytes");
  }
  if (n > file.size() - kPrefix) {
    fail(file.path(), "header length " + std::to_string(n) + " exceeds the " +
                          std::to_string(file.size() - kPrefix) +
                          " bytes after the length prefix (truncated file?)");
  }
  return n;
}

// Serializes `s` as a JSON string exactly as serde_json does (same escapes,
// UTF-8 kept as is); `what` names it if it is not valid UTF-8.
std::string json_string(const std::string& path, const std::string& s, const std::string& what) {
  try {
    return json(s).dump();
  } catch (const json::type_error& e) {
    throw SafetensorsError("cannot save safetensors file " + in_quotes(path) + ": " + what +
                           " is not valid UTF-8 (" + e.what() + ")");
  }
}

struct PlannedTensor {
  const std::string* name;
  const at::Tensor* tensor;
  const DtypeEntry* dtype;
  uint64_t nbytes;
};

[[noreturn]] void fail_save(const std::string& path, const std::string& name,
                            const std::string& message) {
  throw SafetensorsError("cannot save safetensors file " + in_quotes(path) + ": tensor " +
                         in_quotes(name) + " " + message);
}

PlannedTensor plan_tensor(const std::string& path, const std::string& name, const at::Tensor& t) {
  if (name.empty()) {
    throw SafetensorsError("cannot save safetensors file " + in_quotes(path) +
                           ": tensor names must be non-empty");
  }
  if (name == kMetadataKey) fail_save(path, name, "uses the name reserved for metadata");
  if (!t.defined()) fail_save(path, name, "is undefined");
  if (t.layout() != at::kStrided) {
    fail_save(path, name, "is not dense (layout " + c10::str(t.layout()) + ")");
  }
  if (t.is_meta()) fail_save(path, name, "is on the meta device and has no data");
  const DtypeEntry* dtype = find_dtype(t.scalar_type());
  if (dtype == nullptr) {
    fail_save(path, name,
              std::string("has dtype ") + c10::toString(t.scalar_type()) +
                  ", which safetensors cannot hold (supported: " + supported_dtype_names() + ")");
  }
  return {&name, &t, dtype, static_cast<uint64_t>(t.numel()) * c10::elementSize(t.scalar_type())};
}

// Validates the inputs and puts them in safetensors.torch's file order.
std::vector<PlannedTensor> plan_file(
    const std::string& path, const std::vector<std::pair<std::string, at::Tensor>>& tensors) {
  std::vector<PlannedTensor> plan;
  plan.reserve(tensors.size());
  std::set<std::string> seen;
  for (const auto& [name, tensor] : tensors) {
    plan.push_back(plan_tensor(path, name, tensor));
    if (!seen.insert(name).second) fail_save(path, name, "appears twice");
  }
  std::sort(plan.begin(), plan.end(), [](const PlannedTensor& a, const PlannedTensor& b) {
    const int ra = dtype_rank(a.dtype);
    const int rb = dtype_rank(b.dtype);
    return ra != rb ? ra > rb : *a.name < *b.name;
  });
  return plan;
}

// Appends "key":value to the text of a JSON object that is still open.
void append_member(std::string* object, const std::string& key_json,
                   const std::string& value_json) {
  if (object->size() > 1) *object += ',';
  *object += key_json;
  *object += ':';
  *object += value_json;
}

// The JSON header, key order and spacing as serde_json writes it, padded
// with spaces to a multiple of 8 so the data section starts 8-byte aligned.
std::string build_header(const std::string& path, const std::vector<PlannedTensor>& plan,
                         const std::map<std::string, std::string>& metadata) {
  std::string header = "{";
  if (!metadata.empty()) {
    std::string entries = "{";
    for (const auto& [key, value] : metadata) {
      append_member(&entries, json_string(path, key, "metadata key " + in_quotes(key)),
                    json_string(path, value, "metadata value for " + in_quotes(key)));
    }
    append_member(&header, json_string(path, kMetadataKey, kMetadataKey), entries + "}");
  }
  uint64_t offset = 0;
  for (const PlannedTensor& p : plan) {
    append_member(&header, json_string(path, *p.name, "tensor name " + in_quotes(*p.name)),
                  std::string("{\"dtype\":\"") + p.dtype->name + "\",\"shape\":" +
                      json(p.tensor->sizes().vec()).dump() + ",\"data_offsets\":[" +
                      std::to_string(offset) + "," + std::to_string(offset + p.nbytes) + "]}");
    offset += p.nbytes;
  }
  header += '}';
  header.resize((header.size() + 7) / 8 * 8, ' ');
  return header;
}

void write_tensor_bytes(std::ostream& os, const at::Tensor& tensor) {
  // resolve_conj/neg: contiguous() keeps lazy conjugate/negative views lazy,
  // so their memory does not hold the values they represent.
  const at::Tensor cpu = tensor.to(at::kCPU).resolve_conj().resolve_neg().contiguous();
  if (cpu.numel() == 0) return;
  os.write(static_cast<const char*>(cpu.const_data_ptr()),
           static_cast<std::streamsize>(cpu.nbytes()));
}

}  // namespace

const char* safetensors_dtype_name(at::ScalarType dtype) {
  const DtypeEntry* d = find_dtype(dtype);
  if (d == nullptr) {
    throw SafetensorsError(std::string("dtype ") + c10::toString(dtype) +
                           " has no safetensors equivalent (supported: " + supported_dtype_names() +
                           ")");
  }
  return d->name;
}

at::ScalarType scalar_type_from_safetensors(const std::string& name) {
  const DtypeEntry* d = find_dtype(name);
  if (d == nullptr) {
    throw SafetensorsError("unknown safetensors dtype " + in_quotes(name) +
                           " (supported: " + supported_dtype_names() + ")");
  }
  return d->type;
}

SafetensorsReader SafetensorsReader::open(const std::string& path) {
  SafetensorsReader reader;
  reader.file_ = std::make_shared<const MappedFile>(path);
  const MappedFile& file = *reader.file_;
  const uint64_t header_size = read_header_length(file);
  reader.data_start_ = sizeof(uint64_t) + header_size;
  const uint64_t data_size = file.size() - reader.data_start_;

  const json header =
      parse_json_strict(reinterpret_cast<const char*>(file.data()) + sizeof(uint64_t), header_size,
                        "safetensors file " + in_quotes(path) + ": header");
  if (!header.is_object()) fail(path, "header must be a JSON object, got " + header.dump());
  for (const auto& [key, value] : header.items()) {
    if (key == kMetadataKey) {
      reader.metadata_ = parse_metadata(path, value);
    } else {
      reader.tensors_.push_back(parse_tensor_entry(path, key, value, data_size));
    }
  }
  check_tiling(path, &reader.tensors_, data_size);
  for (size_t i = 0; i < reader.tensors_.size(); ++i) reader.index_[reader.tensors_[i].name] = i;
  return reader;
}

const std::string& SafetensorsReader::path() const { return file_->path(); }

std::vector<std::string> SafetensorsReader::names() const {
  std::vector<std::string> out;
  out.reserve(tensors_.size());
  for (const TensorInfo& t : tensors_) out.push_back(t.name);
  return out;
}

const TensorInfo& SafetensorsReader::info(const std::string& name) const {
  const auto it = index_.find(name);
  if (it == index_.end())
    fail(path(), "no tensor " + in_quotes(name) + close_names_hint(name, names()));
  return tensors_[it->second];
}

void SafetensorsReader::release(const std::string& name) const {
  const TensorInfo& t = info(name);
  file_->drop_pages(data_start_ + t.begin, t.end - t.begin);
}

at::Tensor SafetensorsReader::get(const std::string& name, bool copy) const {
  const TensorInfo& t = info(name);
  const auto options = at::TensorOptions().dtype(t.dtype).device(at::kCPU);
  // Empty tensors own no bytes of the file (and may sit at its very end).
  if (t.begin == t.end) return at::empty(t.shape, options);
  uint8_t* src = file_->mutable_data() + data_start_ + t.begin;
  const bool aligned = reinterpret_cast<uintptr_t>(src) % c10::elementSize(t.dtype) == 0;
  if (copy || !aligned) {
    at::Tensor out = at::empty(t.shape, options);
    std::memcpy(out.mutable_data_ptr(), src, t.end - t.begin);
    return out;
  }
  return at::from_blob(
      src, t.shape, [file = file_](void*) {}, options);
}

std::map<std::string, at::Tensor> SafetensorsReader::load_all(bool copy) const {
  std::map<std::string, at::Tensor> out;
  for (const TensorInfo& t : tensors_) out.emplace(t.name, get(t.name, copy));
  return out;
}

void save_safetensors(const std::string& path,
                      const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  const std::vector<PlannedTensor> plan = plan_file(path, tensors);
  const std::string header = build_header(path, plan, metadata);
  write_file_atomic(path, [&](std::ostream& os) {
    const uint64_t header_size = header.size();
    os.write(reinterpret_cast<const char*>(&header_size), sizeof(header_size));
    os.write(header.data(), static_cast<std::streamsize>(header.size()));
    for (const PlannedTensor& p : plan) write_tensor_bytes(os, *p.tensor);
  });
}

void save_safetensors(const std::string& path, const std::map<std::string, at::Tensor>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  save_safetensors(path,
                   std::vector<std::pair<std::string, at::Tensor>>(tensors.begin(), tensors.end()),
                   metadata);
}

namespace {

[[noreturn]] void fail_index(const std::string& path, const std::string& message) {
  throw SafetensorsError("safetensors index " + in_quotes(path) + ": " + message);
}

// Paths are handled as strings with POSIX calls rather than std::filesystem:
// the torch wheels export their own copies of its symbols, which then replace
// libstdc++'s in our binaries and crash (pytorch/pytorch#133437).
bool file_exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

// Shard names come from the index file, so they must not reach outside the
// checkpoint directory.
bool escapes_directory(const std::string& relative_path) {
  if (relative_path.empty() || relative_path.front() == '/') return true;
  size_t start = 0;
  while (true) {
    const size_t slash = relative_path.find('/', start);
    if (relative_path.compare(start, slash - start, "..") == 0) return true;
    if (slash == std::string::npos) return false;
    start = slash + 1;
  }
}

void check_shard_name(const std::string& index_path, const std::string& tensor,
                      const std::string& shard) {
  if (escapes_directory(shard)) {
    fail_index(index_path, "tensor " + in_quotes(tensor) + " maps to shard " + in_quotes(shard) +
                               ", which is not a relative path inside the checkpoint directory");
  }
}

// shard file name -> the tensor names the index puts in it.
std::map<std::string, std::vector<std::string>> read_weight_map(const std::string& path) {
  const MappedFile file(path);
  const char* text = file.size() > 0 ? reinterpret_cast<const char*>(file.data()) : "";
  const json index = parse_json_strict(text, file.size(), "safetensors index " + in_quotes(path));
  if (!index.is_object()) fail_index(path, "must be a JSON object, got " + index.dump());
  const auto weight_map = index.find("weight_map");
  if (weight_map == index.end() || !weight_map->is_object()) {
    fail_index(path, "needs a \"weight_map\" object of tensor name -> shard file");
  }
  std::map<std::string, std::vector<std::string>> shards;
  for (const auto& [tensor, shard] : weight_map->items()) {
    if (!shard.is_string()) {
      fail_index(path, "\"weight_map\" entry for tensor " + in_quotes(tensor) +
                           " must be a shard file name, got " + shard.dump());
    }
    const std::string& shard_name = shard.get_ref<const std::string&>();
    check_shard_name(path, tensor, shard_name);
    shards[shard_name].push_back(tensor);
  }
  return shards;
}

}  // namespace

ShardedSafetensors ShardedSafetensors::open(const std::string& path) {
  ShardedSafetensors checkpoint;
  checkpoint.path_ = path;
  if (!ends_with(path, ".json")) {
    checkpoint.shards_.push_back(SafetensorsReader::open(path));
    checkpoint.tensors_ = checkpoint.shards_[0].tensors();
    for (const TensorInfo& t : checkpoint.tensors_) checkpoint.shard_of_[t.name] = 0;
    return checkpoint;
  }
  // Shard names are relative to the index's directory ("" for the cwd).
  const std::string dir = path.substr(0, path.rfind('/') + 1);
  for (const auto& [shard_name, names] : read_weight_map(path)) {
    const std::string shard_path = dir + shard_name;
    if (!file_exists(shard_path)) {
      fail_index(path, "tensor " + in_quotes(names.front()) + " maps to shard " +
                           in_quotes(shard_name) + ", which does not exist (looked for " +
                           in_quotes(shard_path) + ")");
    }
    const size_t shard_index = checkpoint.shards_.size();
    checkpoint.shards_.push_back(SafetensorsReader::open(shard_path));
    const SafetensorsReader& shard = checkpoint.shards_.back();
    for (const std::string& name : names) {
      if (!shard.contains(name)) {
        fail_index(path, "tensor " + in_quotes(name) + " maps to shard " + in_quotes(shard_name) +
                             ", which has no such tensor" + close_names_hint(name, shard.names()));
      }
      checkpoint.shard_of_[name] = shard_index;
    }
    for (const TensorInfo& t : shard.tensors()) {
      const auto it = checkpoint.shard_of_.find(t.name);
      if (it != checkpoint.shard_of_.end() && it->second == shard_index) {
        checkpoint.tensors_.push_back(t);
      }
    }
  }
  return checkpoint;
}

std::vector<std::string> ShardedSafetensors::names() const {
  std::vector<std::string> out;
  out.reserve(tensors_.size());
  for (const TensorInfo& t : tensors_) out.push_back(t.name);
  return out;
}

const SafetensorsReader& ShardedSafetensors::shard_of(const std::string& name) const {
  const auto it = shard_of_.find(name);
  if (it == shard_of_.end()) {
    throw SafetensorsError("safetensors checkpoint " + in_quotes(path_) + ": no tensor " +
                           in_quotes(name) + close_names_hint(name, names()));
  }
  return shards_[it->second];
}

const TensorInfo& ShardedSafetensors::info(const std::string& name) const {
  return shard_of(name).info(name);
}

at::Tensor ShardedSafetensors::get(const std::string& name, bool copy) const {
  return shard_of(name).get(name, copy);
}

void ShardedSafetensors::release(const std::string& name) const { shard_of(name).release(name); }

std::map<std::string, at::Tensor> ShardedSafetensors::load_all(bool copy) const {
  std::map<std::string, at::Tensor> out;
  for (const TensorInfo& t : tensors_) out.emplace(t.name, get(t.name, copy));
  return out;
}

ShardedSafetensors open_checkpoint_dir(const std::string& dir) {
  const std::string prefix = dir.empty() || dir.back() == '/' ? dir : dir + "/";
  for (const char* candidate : {"model.safetensors.index.json", "model.safetensors"}) {
    if (file_exists(prefix + candidate)) return ShardedSafetensors::open(prefix + candidate);
  }
  throw SafetensorsError("no safetensors checkpoint in " + in_quotes(dir) +
                         ": neither model.safetensors.index.json nor model.safetensors exists");
}

}  // namespace qlora::io
