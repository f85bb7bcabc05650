// QNAT reader and writer; the format is docs/QNAT.md.
#include "qlora/io/qnat.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/Exception.h>
#include <torch/nn/modules/linear.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>
#include <ostream>
#include <set>
#include <sstream>
#include <utility>

#include "qlora/io/atomic_file.h"
#include "qlora/nn/apply_lora.h"
#include "qlora/nn/lora_linear.h"
#include "qlora/nn/qlora_linear.h"

namespace qlora::io {

using nlohmann::json;

// ---- XXH64 ---------------------------------------------------------------------

namespace {

constexpr uint64_t P1 = 11400714785074694791ULL;
constexpr uint64_t P2 = 14029467366897019727ULL;
constexpr uint64_t P3 = 1609587929392839161ULL;
constexpr uint64_t P4 = 9650029242287828579ULL;
constexpr uint64_t P5 = 2870177450012600261ULL;

inline uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }
inline uint64_t read64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;  // little-endian hosts only (x86-64, aarch64)
}
inline uint32_t read32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
inline uint64_t round(uint64_t acc, uint64_t input) {
  acc += input * P2;
  acc = rotl(acc, 31);
  return acc * P1;
}
inline uint64_t merge_round(uint64_t acc, uint64_t val) {
  acc ^= round(0, val);
  return acc * P1 + P4;
}

}  // namespace

uint64_t qnat_checksum(const void* data, size_t n) {
  const uint8_t* p = static_cast<const uint8_t*>(data);
  const uint8_t* const end = p + n;
  uint64_t h;
  if (n >= 32) {
    uint64_t v1 = P1 + P2, v2 = P2, v3 = 0, v4 = 0 - P1;
    const uint8_t* const limit = end - 32;
    do {
      v1 = round(v1, read64(p));
      v2 = round(v2, read64(p + 8));
      v3 = round(v3, read64(p + 16));
      v4 = round(v4, read64(p + 24));
      p += 32;
    } while (p <= limit);
    h = rotl(v1, 1) + rotl(v2, 7) + rotl(v3, 12) + rotl(v4, 18);
    h = merge_round(h, v1);
    h = merge_round(h, v2);
    h = merge_round(h, v3);
    h = merge_round(h, v4);
  } else {
    h = P5;
  }
  h += static_cast<uint64_t>(n);
  while (p + 8 <= end) {
    h ^= round(0, read64(p));
    h = rotl(h, 27) * P1 + P4;
    p += 8;
  }
  if (p + 4 <= end) {
    h ^= static_cast<uint64_t>(read32(p)) * P1;
    h = rotl(h, 23) * P2 + P3;
    p += 4;
  }
  while (p < end) {
    h ^= (*p) * P5;
    h = rotl(h, 11) * P1;
    ++p;
  }
  h ^= h >> 33;
  h *= P2;
  h ^= h >> 29;
  h *= P3;
  h ^= h >> 32;
  return h;
}

// ---- dtypes --------------------------------------------------------------------

const char* qnat_dtype_name(QnatDtype dtype) {
  switch (dtype) {
    case QnatDtype::kF32:
      return "f32";
    case QnatDtype::kF16:
      return "f16";
    case QnatDtype::kBF16:
      return "bf16";
    case QnatDtype::kF64:
      return "f64";
    case QnatDtype::kI64:
      return "i64";
    case QnatDtype::kI32:
      return "i32";
    case QnatDtype::kI16:
      return "i16";
    case QnatDtype::kI8:
      return "i8";
    case QnatDtype::kU8:
      return "u8";
    case QnatDtype::kBool:
      return "bool";
    case QnatDtype::kNF4:
      return "nf4";
    case QnatDtype::kFP4:
      return "fp4";
  }
  return "?";
}

namespace {

struct DtypeRow {
  QnatDtype code;
  at::ScalarType scalar;
};
constexpr DtypeRow kDtypes[] = {
    {QnatDtype::kF32, at::kFloat},  {QnatDtype::kF16, at::kHalf}, {QnatDtype::kBF16, at::kBFloat16},
    {QnatDtype::kF64, at::kDouble}, {QnatDtype::kI64, at::kLong}, {QnatDtype::kI32, at::kInt},
    {QnatDtype::kI16, at::kShort},  {QnatDtype::kI8, at::kChar},  {QnatDtype::kU8, at::kByte},
    {QnatDtype::kBool, at::kBool},
};

std::optional<QnatDtype> dense_code(at::ScalarType s) {
  for (const auto& r : kDtypes)
    if (r.scalar == s) return r.code;
  return std::nullopt;
}
std::optional<at::ScalarType> dense_scalar(uint32_t code) {
  for (const auto& r : kDtypes)
    if (static_cast<uint32_t>(r.code) == code) return r.scalar;
  return std::nullopt;
}
std::optional<at::ScalarType> scalar_from_name(const std::string& name) {
  for (const auto& r : kDtypes)
    if (name == qnat_dtype_name(r.code)) return r.scalar;
  return std::nullopt;
}
std::string scalar_name(at::ScalarType s) {
  const auto c = dense_code(s);
  return c ? qnat_dtype_name(*c) : "?";
}

uint64_t align_up(uint64_t x) { return (x + kQnatAlignment - 1) / kQnatAlignment * kQnatAlignment; }

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// numel of `shape`, or nullopt on a negative dimension or overflow.
std::optional<uint64_t> checked_numel(const std::vector<int64_t>& shape) {
  uint64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0) return std::nullopt;
    const uint64_t u = static_cast<uint64_t>(d);
    if (u != 0 && n > std::numeric_limits<uint64_t>::max() / u) return std::nullopt;
    n *= u;
  }
  return n;
}

[[noreturn]] void fail(const std::string& path, const std::string& what) {
  throw QnatError("QNAT file " + path + ": " + what);
}
[[noreturn]] void fail_tensor(const std::string& path, const std::string& name,
                              const std::string& what) {
  throw QnatError("QNAT file " + path + ": tensor \"" + name + "\": " + what);
}

// ---- writing -------------------------------------------------------------------

void put32(std::string& s, uint32_t v) { s.append(reinterpret_cast<const char*>(&v), 4); }
void put64(std::string& s, uint64_t v) { s.append(reinterpret_cast<const char*>(&v), 8); }
void put_str(std::string& s, const std::string& v) {
  put32(s, static_cast<uint32_t>(v.size()));
  s += v;
}

json lora_json(const nn::LoRAConfig& c, bool full) {
  json j = {{"r", c.r},
            {"alpha", c.alpha},
            {"dropout", c.dropout},
            {"use_rslora", c.use_rslora},
            {"use_dora", c.use_dora},
            {"bias", c.bias}};
  if (full) {
    j["target_modules"] = c.target_modules;
    j["target_regex"] = c.target_regex;
    j["exclude_modules"] = c.exclude_modules;
  }
  return j;
}

nn::LoRAConfig lora_from_json(const json& j) {
  nn::LoRAConfig c;
  c.r = j.at("r").get<int64_t>();
  c.alpha = j.at("alpha").get<double>();
  c.dropout = j.at("dropout").get<double>();
  c.use_rslora = j.at("use_rslora").get<bool>();
  c.use_dora = j.at("use_dora").get<bool>();
  c.bias = j.at("bias").get<std::string>();
  if (j.contains("target_modules"))
    c.target_modules = j.at("target_modules").get<std::vector<std::string>>();
  if (j.contains("target_regex")) c.target_regex = j.at("target_regex").get<std::string>();
  if (j.contains("exclude_modules"))
    c.exclude_modules = j.at("exclude_modules").get<std::vector<std::string>>();
  c.validate();
  return c;
}

uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

struct PendingTensor {
  QnatTensor info;
  at::Tensor data;  // CPU, contiguous
};

bool is_lora_tensor(const std::string& name) {
  for (const char* s : {".lora_A", ".lora_B", ".lora_magnitude_vector"}) {
    const size_t n = std::strlen(s);
    if (name.size() >= n && name.compare(name.size() - n, n, s) == 0) return true;
  }
  return false;
}

}  // namespace

void save_qnat(const std::string& path, models::LlamaForCausalLMImpl& model,
               const QnatMetadata& metadata) {
  json meta;
  meta["format"] = "qnat";
  meta["version"] = kQnatVersion;
  meta["model_config"] = json::parse(model.config().to_json());
  meta["tokenizer"] = {{"source", metadata.tokenizer_source}, {"kind", metadata.tokenizer_kind}};
  meta["lora"] = metadata.lora ? lora_json(*metadata.lora, true) : json();
  if (metadata.quantization) {
    const auto& q = metadata.quantization->quant;
    meta["quantization"] = {{"blocksize", q.blocksize},
                            {"quant_type", q.quant_type},
                            {"double_quant", q.double_quant},
                            {"storage", scalar_name(q.storage)},
                            {"compute_dtype", scalar_name(metadata.quantization->compute_dtype)}};
  } else {
    meta["quantization"] = json();
  }
  if (!metadata.extra_json.empty()) {
    json extra;
    try {
      extra = json::parse(metadata.extra_json);
    } catch (const json::exception& e) {
      throw QnatError("save_qnat " + path + ": extra_json is not valid JSON: " + e.what());
    }
    if (!extra.is_object()) throw QnatError("save_qnat " + path + ": extra_json must be an object");
    meta["extra"] = extra;
  }

  json modules = json::object(), quant_states = json::object();
  std::set<std::string> packed_names;
  for (const auto& [name, layer] : nn::lora_layers(model)) {
    json m;
    m["lora"] = lora_json(layer->lora_config(), false);
    if (auto q = std::dynamic_pointer_cast<nn::QLoRALinearImpl>(layer)) {
      m["type"] = "qlora";
      m["compute_dtype"] = scalar_name(q->compute_dtype());
      const QuantState& s = q->quant_state();
      const std::string w = name + ".weight";
      json st = {{"quant_type", s.quant_type},
                 {"blocksize", s.blocksize},
                 {"dtype", scalar_name(s.dtype)},
                 {"shape", s.shape},
                 {"storage", scalar_name(q->packed_weight().scalar_type())},
                 {"packed_shape", q->packed_weight().sizes().vec()},
                 {"absmax", name + ".weight_absmax"},
                 {"quant_map", name + ".weight_quant_map"}};
      if (s.nested) {
        st["nested"] = {{"absmax", name + ".weight_nested_absmax"},
                        {"quant_map", name + ".weight_nested_quant_map"},
                        {"blocksize", s.nested->blocksize},
                        {"offset_bits", float_bits(s.nested->offset)},
                        {"dtype", scalar_name(s.nested->dtype)}};
      } else {
        st["nested"] = json();
      }
      quant_states[w] = st;
      packed_names.insert(w);
    } else if (std::dynamic_pointer_cast<nn::LoRALinearImpl>(layer)) {
      m["type"] = "lora";
    } else {
      throw QnatError("save_qnat " + path + ": module \"" + name +
                      "\" is a LoRA layer of an unknown kind");
    }
    modules[name] = m;
  }
  meta["modules"] = modules;
  meta["quant_states"] = quant_states;

  // Every parameter and buffer, aliases (tied weights) written once.
  std::vector<PendingTensor> pending;
  json aliases = json::object();
  std::vector<std::string> trainable;
  std::vector<std::pair<std::string, at::Tensor>> all;
  for (const auto& p : model.named_parameters(true)) {
    all.emplace_back(p.key(), p.value());
    if (p.value().requires_grad()) trainable.push_back(p.key());
  }
  for (const auto& b : model.named_buffers(true)) all.emplace_back(b.key(), b.value());
  bool wrote_adapter = false;
  std::vector<std::pair<const void*, std::string>> seen;
  for (auto& [name, t] : all) {
    if (!t.defined()) continue;
    if (is_lora_tensor(name)) {
      if (!metadata.include_adapter) continue;
      wrote_adapter = true;
    }
    const void* ptr = t.numel() > 0 ? t.data_ptr() : nullptr;
    bool aliased = false;
    for (const auto& [sp, sn] : seen) {
      if (ptr != nullptr && sp == ptr) {
        const at::Tensor& o =
            pending[std::find_if(pending.begin(), pending.end(),
                                 [&](const PendingTensor& x) { return x.info.name == sn; }) -
                    pending.begin()]
                .data;
        if (o.sizes() == t.sizes() && o.scalar_type() == t.scalar_type() && t.is_contiguous()) {
          aliases[name] = sn;
          aliased = true;
          break;
        }
      }
    }
    if (aliased) continue;
    PendingTensor pt;
    pt.info.name = name;
    pt.data = t.detach().to(at::kCPU).contiguous();
    if (packed_names.count(name)) {
      const json& st = quant_states[name];
      pt.info.dtype = st["quant_type"] == "fp4" ? QnatDtype::kFP4 : QnatDtype::kNF4;
      pt.info.shape = st["shape"].get<std::vector<int64_t>>();
      pt.info.quant_state = name;
    } else {
      const auto code = dense_code(t.scalar_type());
      if (!code)
        throw QnatError("save_qnat " + path + ": tensor \"" + name + "\" has dtype " +
                        std::string(c10::toString(t.scalar_type())) + ", which QNAT cannot hold");
      pt.info.dtype = *code;
      pt.info.shape = t.sizes().vec();
    }
    pt.info.nbytes = pt.data.nbytes();
    pt.info.checksum = qnat_checksum(pt.data.data_ptr(), pt.info.nbytes);
    seen.emplace_back(ptr, name);
    pending.push_back(std::move(pt));
  }
  meta["aliases"] = aliases;
  meta["trainable"] = trainable;
  const uint32_t flags = wrote_adapter ? kQnatFlagHasAdapter : 0;

  // Header: offsets are fixed-width, so its size is known before they are.
  const std::string meta_text = meta.dump();
  auto header_bytes = [&]() {
    std::string h = "QNAT";
    put32(h, kQnatVersion);
    put32(h, flags);
    put64(h, meta_text.size());
    h += meta_text;
    put64(h, pending.size());
    for (const auto& p : pending) {
      put_str(h, p.info.name);
      put32(h, static_cast<uint32_t>(p.info.dtype));
      put32(h, static_cast<uint32_t>(p.info.shape.size()));
      for (int64_t d : p.info.shape) put64(h, static_cast<uint64_t>(d));
      put64(h, p.info.offset);
      put64(h, p.info.nbytes);
      put64(h, p.info.checksum);
      put_str(h, p.info.quant_state);
    }
    put64(h, qnat_checksum(h.data(), h.size()));
    return h;
  };
  uint64_t offset = align_up(header_bytes().size());
  for (auto& p : pending) {
    p.info.offset = offset;
    offset = align_up(offset + p.info.nbytes);
  }
  const std::string header = header_bytes();

  write_file_atomic(path, [&](std::ostream& out) {
    static const char zeros[kQnatAlignment] = {};
    out.write(header.data(), static_cast<std::streamsize>(header.size()));
    uint64_t pos = header.size();
    for (const auto& p : pending) {
      out.write(zeros, static_cast<std::streamsize>(p.info.offset - pos));
      out.write(static_cast<const char*>(p.data.data_ptr()),
                static_cast<std::streamsize>(p.info.nbytes));
      pos = p.info.offset + p.info.nbytes;
    }
  });
}

// ---- reading -------------------------------------------------------------------

namespace {

class Cursor {
 public:
  Cursor(const uint8_t* data, uint64_t size, const std::string& path)
      : data_(data), size_(size), path_(path) {}
  uint64_t pos() const { return pos_; }
  uint64_t remaining() const { return size_ - pos_; }
  void need(uint64_t n, const std::string& what) const {
    if (n > remaining())
      fail(path_, "truncated: " + what + " needs " + std::to_string(n) + " bytes at offset " +
                      std::to_string(pos_) + " but the file has " + std::to_string(size_) +
                      " bytes");
  }
  uint32_t u32(const std::string& what) {
    need(4, what);
    const uint32_t v = read32(data_ + pos_);
    pos_ += 4;
    return v;
  }
  uint64_t u64(const std::string& what) {
    need(8, what);
    const uint64_t v = read64(data_ + pos_);
    pos_ += 8;
    return v;
  }
  std::string bytes(uint64_t n, const std::string& what) {
    need(n, what);
    std::string s(reinterpret_cast<const char*>(data_ + pos_), n);
    pos_ += n;
    return s;
  }

 private:
  const uint8_t* data_;
  uint64_t size_, pos_ = 0;
  const std::string& path_;
};

constexpr uint32_t kMaxNameBytes = 4096;
constexpr uint32_t kMaxDims = 8;

}  // namespace

const std::string& QnatFile::path() const { return file_->path(); }

const QnatTensor& QnatFile::info(const std::string& name) const {
  const auto it = index_.find(name);
  if (it == index_.end()) fail_tensor(path(), name, "not in the file");
  return tensors_[it->second];
}

void QnatFile::verify(const std::string& name) const {
  const QnatTensor& t = info(name);
  const uint64_t got = qnat_checksum(file_->data() + t.offset, t.nbytes);
  if (got != t.checksum) {
    std::ostringstream s;
    s << "checksum mismatch (stored 0x" << std::hex << t.checksum << ", data hashes to 0x" << got
      << "): the file is corrupted";
    fail_tensor(path(), name, s.str());
  }
}

void QnatFile::verify_all() const {
  for (const auto& t : tensors_) verify(t.name);
}

at::Tensor QnatFile::tensor(const std::string& name, bool verify_checksum) const {
  const QnatTensor& t = info(name);
  if (verify_checksum) verify(name);
  at::ScalarType dtype;
  std::vector<int64_t> shape;
  const auto p = packed_.find(name);
  if (p != packed_.end()) {
    dtype = p->second.first;
    shape = p->second.second;
  } else {
    dtype = *dense_scalar(static_cast<uint32_t>(t.dtype));
    shape = t.shape;
  }
  auto keep = file_;
  void* ptr = file_->mutable_data() != nullptr ? file_->mutable_data() + t.offset : nullptr;
  if (t.nbytes == 0) return at::empty(shape, at::TensorOptions(dtype));
  return at::from_blob(
      ptr, shape, [keep](void*) {}, at::TensorOptions(dtype));
}

QnatFile QnatFile::open(const std::string& path, bool verify_checksums) {
  QnatFile f;
  f.file_ = std::make_shared<const MappedFile>(path);
  const uint8_t* data = f.file_->data();
  const uint64_t size = f.file_->size();
  Cursor c(data, size, path);

  const std::string magic = c.bytes(4, "the magic");
  if (magic != "QNAT") fail(path, "not a QNAT file (magic bytes are not \"QNAT\")");
  f.version_ = c.u32("the version");
  if (f.version_ != kQnatVersion)
    fail(path, "unsupported QNAT version " + std::to_string(f.version_) +
                   " (this reader supports version " + std::to_string(kQnatVersion) + ")");
  f.flags_ = c.u32("the flags");
  if ((f.flags_ & ~kQnatFlagHasAdapter) != 0) {
    std::ostringstream s;
    s << "unknown flags 0x" << std::hex << (f.flags_ & ~kQnatFlagHasAdapter)
      << " (version 1 defines only bit 0, has-adapter)";
    fail(path, s.str());
  }
  const uint64_t meta_len = c.u64("the metadata length");
  c.need(meta_len, "the metadata (length " + std::to_string(meta_len) + ")");
  f.metadata_json_ = c.bytes(meta_len, "the metadata");
  const uint64_t count = c.u64("the tensor count");
  // Every entry takes at least 48 bytes: a bound before reserving anything.
  if (count > c.remaining() / 48)
    fail(path, "truncated or corrupt: tensor count " + std::to_string(count) +
                   " does not fit in the " + std::to_string(c.remaining()) +
                   " bytes left for the tensor table");
  f.tensors_.reserve(count);
  for (uint64_t i = 0; i < count; ++i) {
    const std::string entry = "tensor table entry " + std::to_string(i);
    QnatTensor t;
    const uint32_t name_len = c.u32(entry + " name length");
    if (name_len == 0 || name_len > kMaxNameBytes)
      fail(path, entry + ": name length " + std::to_string(name_len) + " is not in 1.." +
                     std::to_string(kMaxNameBytes));
    t.name = c.bytes(name_len, entry + " name");
    const uint32_t dtype = c.u32(entry + " dtype");
    if (!dense_scalar(dtype) && dtype != static_cast<uint32_t>(QnatDtype::kNF4) &&
        dtype != static_cast<uint32_t>(QnatDtype::kFP4))
      fail_tensor(path, t.name, "unknown dtype code " + std::to_string(dtype));
    t.dtype = static_cast<QnatDtype>(dtype);
    const uint32_t ndim = c.u32(entry + " rank");
    if (ndim > kMaxDims)
      fail_tensor(path, t.name,
                  "rank " + std::to_string(ndim) + " exceeds " + std::to_string(kMaxDims));
    for (uint32_t d = 0; d < ndim; ++d) {
      const uint64_t dim = c.u64(entry + " shape");
      if (dim > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
        fail_tensor(path, t.name, "negative dimension in its shape");
      t.shape.push_back(static_cast<int64_t>(dim));
    }
    t.offset = c.u64(entry + " offset");
    t.nbytes = c.u64(entry + " byte length");
    t.checksum = c.u64(entry + " checksum");
    const uint32_t qs_len = c.u32(entry + " quant-state reference length");
    if (qs_len > kMaxNameBytes)
      fail_tensor(path, t.name,
                  "quant-state reference length " + std::to_string(qs_len) + " exceeds " +
                      std::to_string(kMaxNameBytes));
    t.quant_state = c.bytes(qs_len, entry + " quant-state reference");
    if (!f.index_.emplace(t.name, f.tensors_.size()).second)
      fail_tensor(path, t.name, "appears twice in the tensor table");
    f.tensors_.push_back(std::move(t));
  }
  const uint64_t header_end = c.pos();
  const uint64_t stored_sum = c.u64("the header checksum");
  const uint64_t header_sum = qnat_checksum(data, header_end);
  if (stored_sum != header_sum)
    fail(path, "header checksum mismatch: the header, metadata or tensor table is corrupted");
  const uint64_t data_start = align_up(c.pos());

  // Metadata: JSON, then the parts the reader relies on.
  json meta;
  try {
    meta = json::parse(f.metadata_json_);
  } catch (const json::exception& e) {
    fail(path, std::string("metadata is not valid JSON: ") + e.what());
  }
  if (!meta.is_object() || !meta.contains("model_config") || !meta["model_config"].is_object())
    fail(path, "metadata has no \"model_config\" object");
  try {
    f.config_ = models::LlamaConfig::from_json(meta["model_config"].dump(),
                                               path + " (metadata \"model_config\")");
  } catch (const std::exception& e) {
    fail(path, std::string("metadata \"model_config\": ") + e.what());
  }

  // Table entries: bounds, alignment, lengths, no overlap.
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  for (const auto& t : f.tensors_) {
    if (t.offset % kQnatAlignment != 0)
      fail_tensor(path, t.name,
                  "offset " + std::to_string(t.offset) + " is not " +
                      std::to_string(kQnatAlignment) + "-byte aligned");
    if (t.offset < data_start)
      fail_tensor(path, t.name,
                  "offset " + std::to_string(t.offset) +
                      " lies before the data section (which starts at " +
                      std::to_string(data_start) + ")");
    if (t.offset > size || t.nbytes > size - t.offset)
      fail_tensor(path, t.name,
                  "bytes [" + std::to_string(t.offset) + ", " + std::to_string(t.offset) + " + " +
                      std::to_string(t.nbytes) + ") run past the end of the file (" +
                      std::to_string(size) + " bytes): the file is truncated");
    const auto numel = checked_numel(t.shape);
    if (!numel) fail_tensor(path, t.name, "shape " + shape_str(t.shape) + " overflows");
    if (t.dtype != QnatDtype::kNF4 && t.dtype != QnatDtype::kFP4) {
      if (!t.quant_state.empty())
        fail_tensor(path, t.name, "a dense tensor with a quant-state reference");
      const uint64_t item = c10::elementSize(*dense_scalar(static_cast<uint32_t>(t.dtype)));
      if (*numel > std::numeric_limits<uint64_t>::max() / item || *numel * item != t.nbytes)
        fail_tensor(path, t.name,
                    std::string("byte length ") + std::to_string(t.nbytes) +
                        " does not match dtype " + qnat_dtype_name(t.dtype) + " and shape " +
                        shape_str(t.shape));
    }
    if (t.nbytes > 0) ranges.emplace_back(t.offset, t.offset + t.nbytes);
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i)
    if (ranges[i].first < ranges[i - 1].second) {
      std::string a, b;
      for (const auto& t : f.tensors_) {
        if (t.offset == ranges[i - 1].first && t.nbytes > 0) a = t.name;
        if (t.offset == ranges[i].first && t.nbytes > 0) b = t.name;
      }
      fail_tensor(path, b, "overlaps tensor \"" + a + "\"");
    }

  // Packed 4-bit tensors and their quant-state records.
  const json* states = meta.contains("quant_states") ? &meta["quant_states"] : nullptr;
  for (const auto& t : f.tensors_) {
    if (t.dtype != QnatDtype::kNF4 && t.dtype != QnatDtype::kFP4) continue;
    if (states == nullptr || !states->is_object() || !states->contains(t.quant_state))
      fail_tensor(path, t.name,
                  "its quant-state record \"" + t.quant_state +
                      "\" is missing from metadata \"quant_states\"");
    const json& st = (*states)[t.quant_state];
    auto need_tensor = [&](const std::string& key, at::ScalarType dtype,
                           std::optional<uint64_t> numel) {
      if (!f.contains(key))
        fail_tensor(path, t.name, "quant-state tensor \"" + key + "\" is missing");
      const QnatTensor& a = f.info(key);
      if (a.dtype != *dense_code(dtype))
        fail_tensor(path, key,
                    std::string("is ") + qnat_dtype_name(a.dtype) + ", expected " +
                        scalar_name(dtype) + " (quant state of \"" + t.name + "\")");
      if (numel && *checked_numel(a.shape) != *numel)
        fail_tensor(path, key,
                    "has " + std::to_string(*checked_numel(a.shape)) + " elements, expected " +
                        std::to_string(*numel) + " (quant state of \"" + t.name + "\")");
    };
    try {
      const std::string qt = st.at("quant_type").get<std::string>();
      if (qt != qnat_dtype_name(t.dtype))
        fail_tensor(
            path, t.name,
            "dtype " + std::string(qnat_dtype_name(t.dtype)) + " but its quant state says " + qt);
      if (st.at("shape").get<std::vector<int64_t>>() != t.shape)
        fail_tensor(path, t.name, "shape differs from its quant-state record");
      const int64_t bs = st.at("blocksize").get<int64_t>();
      if (bs < 16 || bs > 65536 || (bs & (bs - 1)) != 0)
        fail_tensor(path, t.name, "blocksize " + std::to_string(bs) + " is not a power of two");
      const auto storage = scalar_from_name(st.at("storage").get<std::string>());
      if (!storage) fail_tensor(path, t.name, "unknown packed storage dtype");
      const auto packed_shape = st.at("packed_shape").get<std::vector<int64_t>>();
      const auto pn = checked_numel(packed_shape);
      const uint64_t item = c10::elementSize(*storage);
      const uint64_t numel = *checked_numel(t.shape);
      const uint64_t need = (numel + 1) / 2;
      if (!pn || *pn * item != t.nbytes || t.nbytes < need || t.nbytes >= need + item)
        fail_tensor(path, t.name,
                    "byte length " + std::to_string(t.nbytes) + " does not match " +
                        qnat_dtype_name(t.dtype) + " shape " + shape_str(t.shape) + " (" +
                        std::to_string(need) + " packed bytes)");
      if (!scalar_from_name(st.at("dtype").get<std::string>()))
        fail_tensor(path, t.name, "unknown original dtype in its quant state");
      const uint64_t blocks = (numel + bs - 1) / bs;
      const json& nested = st.at("nested");
      need_tensor(st.at("quant_map").get<std::string>(), at::kFloat, 16);
      if (nested.is_null()) {
        need_tensor(st.at("absmax").get<std::string>(), at::kFloat, blocks);
      } else {
        need_tensor(st.at("absmax").get<std::string>(), at::kByte, blocks);
        const int64_t nbs = nested.at("blocksize").get<int64_t>();
        if (nbs < 16 || nbs > 65536 || (nbs & (nbs - 1)) != 0)
          fail_tensor(path, t.name, "nested blocksize is not a power of two");
        need_tensor(nested.at("absmax").get<std::string>(), at::kFloat, (blocks + nbs - 1) / nbs);
        need_tensor(nested.at("quant_map").get<std::string>(), at::kFloat, 256);
        nested.at("offset_bits").get<uint32_t>();
        if (!scalar_from_name(nested.at("dtype").get<std::string>()))
          fail_tensor(path, t.name, "unknown nested dtype in its quant state");
      }
      f.packed_[t.name] = {*storage, packed_shape};
    } catch (const json::exception& e) {
      fail_tensor(path, t.name, std::string("malformed quant-state record: ") + e.what());
    }
  }
  if (verify_checksums) f.verify_all();
  return f;
}

// ---- load_qnat -----------------------------------------------------------------

namespace {

class QnatWeights : public models::LlamaWeightSource {
 public:
  QnatWeights(const QnatFile& file, const json& meta, const QnatLoadOptions& opts,
              const std::set<std::string>& trainable)
      : file_(file), meta_(meta), opts_(opts), trainable_(trainable) {}

  std::shared_ptr<torch::nn::Module> linear(const std::string& name, int64_t in, int64_t out,
                                            bool bias) override {
    at::NoGradGuard no_grad;
    std::optional<at::Tensor> b;
    if (bias) b = fetch(name + ".bias", {out});
    const json& modules = meta_.at("modules");
    if (!modules.contains(name)) {
      return models::make_linear(fetch(name + ".weight", {out, in}), b).ptr();
    }
    const json& m = modules.at(name);
    const nn::LoRAConfig lora = lora_from_json(m.at("lora"));
    const std::string type = m.at("type").get<std::string>();
    if (type == "lora")
      return std::make_shared<nn::LoRALinearImpl>(fetch(name + ".weight", {out, in}), b, lora);
    if (type != "qlora")
      fail(file_.path(), "metadata module \"" + name + "\" has unknown type \"" + type + "\"");
    const std::string w = name + ".weight";
    if (!file_.contains(w)) fail_tensor(file_.path(), w, "missing (needed by the model)");
    const json& st = meta_.at("quant_states").at(w);
    QuantState s;
    s.shape = st.at("shape").get<std::vector<int64_t>>();
    if (s.shape != std::vector<int64_t>{out, in})
      fail_tensor(file_.path(), w,
                  "4-bit weight has shape " + shape_str(s.shape) + " but the model config needs " +
                      shape_str({out, in}));
    s.quant_type = st.at("quant_type").get<std::string>();
    s.blocksize = st.at("blocksize").get<int64_t>();
    s.dtype = *scalar_from_name(st.at("dtype").get<std::string>());
    s.absmax = raw(st.at("absmax").get<std::string>());
    s.code = raw(st.at("quant_map").get<std::string>());
    const json& nested = st.at("nested");
    if (!nested.is_null()) {
      NestedQuantState n;
      n.absmax = raw(nested.at("absmax").get<std::string>());
      n.code = raw(nested.at("quant_map").get<std::string>());
      n.blocksize = nested.at("blocksize").get<int64_t>();
      n.offset = bits_float(nested.at("offset_bits").get<uint32_t>());
      n.dtype = *scalar_from_name(nested.at("dtype").get<std::string>());
      s.nested = n;
    }
    const at::Tensor packed = raw(w);
    const auto compute = scalar_from_name(m.at("compute_dtype").get<std::string>());
    if (!compute) fail(file_.path(), "metadata module \"" + name + "\": unknown compute_dtype");
    return std::make_shared<nn::QLoRALinearImpl>(packed, s, b, lora, *compute);
  }

  at::Tensor tensor(const std::string& name, at::IntArrayRef shape) override {
    at::NoGradGuard no_grad;
    return fetch(name, shape);
  }

  std::set<std::string> used;

 private:
  at::Tensor raw(const std::string& name) {
    if (!file_.contains(name)) fail_tensor(file_.path(), name, "missing (needed by the model)");
    used.insert(name);
    at::Tensor t = file_.tensor(name);
    if (!opts_.zero_copy || trainable_.count(name)) t = t.clone();
    return t.to(opts_.device);
  }
  at::Tensor fetch(const std::string& name, at::IntArrayRef shape) {
    at::Tensor t = raw(name);
    if (t.sizes() != shape)
      fail_tensor(file_.path(), name,
                  "has shape " + shape_str(t.sizes().vec()) + " but the model config needs " +
                      shape_str(shape.vec()));
    if (!t.is_floating_point())
      fail_tensor(file_.path(), name,
                  "is " + scalar_name(t.scalar_type()) + ", expected a floating-point tensor");
    return t;
  }

  const QnatFile& file_;
  const json& meta_;
  const QnatLoadOptions& opts_;
  const std::set<std::string>& trainable_;
};

}  // namespace

models::LlamaForCausalLM load_qnat(const std::string& path, const QnatLoadOptions& options,
                                   QnatMetadata* metadata) {
  const QnatFile file = QnatFile::open(path, options.verify_checksums);
  const json meta = json::parse(file.metadata_json());
  std::optional<models::LlamaForCausalLM> model;
  std::set<std::string> trainable;
  json aliases;
  std::set<std::string> used;
  try {
    trainable = meta.at("trainable").get<std::set<std::string>>();
    aliases = meta.at("aliases");
    QnatWeights weights(file, meta, options, trainable);
    try {
      model.emplace(file.config(), weights);
    } catch (const QnatError&) {
      throw;
    } catch (const json::exception&) {
      throw;
    } catch (const std::exception& e) {
      fail(path, std::string("building the model failed: ") + e.what());
    }
    used = weights.used;
  } catch (const json::exception& e) {
    fail(path, std::string("malformed metadata: ") + e.what());
  }

  // Every parameter and buffer from the file (LoRA weights, and anything the
  // constructors made themselves), bit for bit.
  {
    at::NoGradGuard no_grad;
    std::vector<std::pair<std::string, at::Tensor>> all;
    for (const auto& p : (*model)->named_parameters(true)) all.emplace_back(p.key(), p.value());
    for (const auto& b : (*model)->named_buffers(true)) all.emplace_back(b.key(), b.value());
    for (auto& [name, t] : all) {
      std::string src = name;
      if (aliases.contains(name) && aliases[name].is_string())
        src = aliases[name].get<std::string>();
      if (!file.contains(src)) {
        if (is_lora_tensor(name) && !file.has_adapter()) continue;  // fresh no-op adapter
        fail_tensor(path, src, "missing (the model has \"" + name + "\")");
      }
      used.insert(src);
      const QnatTensor& info = file.info(src);
      if (info.dtype == QnatDtype::kNF4 || info.dtype == QnatDtype::kFP4) {
        const at::Tensor v = file.tensor(src);
        if (v.sizes() != t.sizes() || v.scalar_type() != t.scalar_type())
          fail_tensor(path, src, "packed storage does not match the model's \"" + name + "\"");
        if (v.data_ptr() != t.data_ptr()) t.copy_(v);
        continue;
      }
      const at::ScalarType dt = *dense_scalar(static_cast<uint32_t>(info.dtype));
      if (info.shape != t.sizes().vec() || dt != t.scalar_type())
        fail_tensor(path, src,
                    std::string("is ") + qnat_dtype_name(info.dtype) + " " + shape_str(info.shape) +
                        " but the model's \"" + name + "\" is " + scalar_name(t.scalar_type()) +
                        " " + shape_str(t.sizes().vec()));
      const at::Tensor v = file.tensor(src);
      if (t.numel() > 0 && v.data_ptr() != t.data_ptr()) t.copy_(v);
    }
    for (const auto& p : (*model)->named_parameters(true))
      p.value().requires_grad_(trainable.count(p.key()) != 0);
  }
  for (const auto& t : file.tensors())
    if (!used.count(t.name))
      fail_tensor(path, t.name, "unexpected: not part of the model the metadata describes");

  if (metadata) {
    *metadata = QnatMetadata{};
    try {
      metadata->tokenizer_source = meta.at("tokenizer").value("source", "");
      metadata->tokenizer_kind = meta.at("tokenizer").value("kind", "");
      if (!meta.at("lora").is_null()) metadata->lora = lora_from_json(meta.at("lora"));
      const json& q = meta.at("quantization");
      if (!q.is_null()) {
        nn::QuantizedBaseConfig b;
        b.quant.blocksize = q.at("blocksize").get<int64_t>();
        b.quant.quant_type = q.at("quant_type").get<std::string>();
        b.quant.double_quant = q.at("double_quant").get<bool>();
        b.quant.storage = scalar_from_name(q.at("storage").get<std::string>()).value_or(at::kByte);
        b.compute_dtype =
            scalar_from_name(q.at("compute_dtype").get<std::string>()).value_or(at::kFloat);
        metadata->quantization = b;
      }
      metadata->include_adapter = file.has_adapter();
      if (meta.contains("extra")) metadata->extra_json = meta["extra"].dump();
    } catch (const json::exception& e) {
      fail(path, std::string("malformed metadata: ") + e.what());
    } catch (const c10::Error& e) {
      fail(path, std::string("malformed metadata: ") + e.what());
    }
  }
  (*model)->eval();
  return *model;
}

}  // namespace qlora::io
