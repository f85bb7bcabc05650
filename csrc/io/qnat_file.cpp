// The QNAT container (docs/QNAT.md): reading, validating and writing a table
// of named tensors. Nothing here knows what the tensors make.
#include "qlora/io/qnat_file.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>
#include <ostream>
#include <sstream>
#include <utility>

#include "qlora/io/atomic_file.h"
#include "util/byte_cursor.h"
#include "util/strings.h"
#include "util/xxhash64.h"

namespace qlora::io {

using json = nlohmann::json;

uint64_t qnat_checksum(const void* data, size_t n) { return util::xxhash64(data, n); }

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

// The dense torch dtype of a raw table code (nullopt: unknown or packed).
std::optional<at::ScalarType> dense_scalar_code(uint32_t code) {
  for (const auto& r : kDtypes)
    if (static_cast<uint32_t>(r.code) == code) return r.scalar;
  return std::nullopt;
}

uint64_t align_up(uint64_t x) { return (x + kQnatAlignment - 1) / kQnatAlignment * kQnatAlignment; }

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

void put32(std::string& s, uint32_t v) { s.append(reinterpret_cast<const char*>(&v), 4); }
void put64(std::string& s, uint64_t v) { s.append(reinterpret_cast<const char*>(&v), 8); }
void put_str(std::string& s, const std::string& v) {
  put32(s, static_cast<uint32_t>(v.size()));
  s += v;
}

constexpr uint32_t kMaxNameBytes = 4096;
constexpr uint32_t kMaxDims = 8;

}  // namespace

std::optional<QnatDtype> qnat_dense_dtype(at::ScalarType scalar) {
  for (const auto& r : kDtypes)
    if (r.scalar == scalar) return r.code;
  return std::nullopt;
}

std::optional<at::ScalarType> qnat_scalar_type(QnatDtype dtype) {
  return dense_scalar_code(static_cast<uint32_t>(dtype));
}

std::optional<at::ScalarType> qnat_scalar_from_name(const std::string& name) {
  for (const auto& r : kDtypes)
    if (name == qnat_dtype_name(r.code)) return r.scalar;
  return std::nullopt;
}

std::string qnat_scalar_name(at::ScalarType scalar) {
  const auto c = qnat_dense_dtype(scalar);
  return c ? qnat_dtype_name(*c) : "?";
}

// ---- reading -------------------------------------------------------------------

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
    dtype = *qnat_scalar_type(t.dtype);
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
  auto c = util::ByteCursor(data, size, [&path](const std::string& what) { fail(path, what); });

  const std::string magic = c.read_string(4, "the magic");
  if (magic != "QNAT") fail(path, "not a QNAT file (magic bytes are not \"QNAT\")");
  f.version_ = c.read<uint32_t>("the version");
  if (f.version_ != kQnatVersion)
    fail(path, "unsupported QNAT version " + std::to_string(f.version_) +
                   " (this reader supports version " + std::to_string(kQnatVersion) + ")");
  f.flags_ = c.read<uint32_t>("the flags");
  if ((f.flags_ & ~kQnatFlagHasAdapter) != 0) {
    std::ostringstream s;
    s << "unknown flags 0x" << std::hex << (f.flags_ & ~kQnatFlagHasAdapter)
      << " (version 1 defines only bit 0, has-adapter)";
    fail(path, s.str());
  }
  const uint64_t meta_len = c.read<uint64_t>("the metadata length");
  c.need(meta_len, "the metadata (length " + std::to_string(meta_len) + ")");
  f.metadata_json_ = c.read_string(meta_len, "the metadata");
  const uint64_t count = c.read<uint64_t>("the tensor count");
  // Every entry takes at least 48 bytes: a bound before reserving anything.
  if (count > c.remaining() / 48)
    fail(path, "truncated or corrupt: tensor count " + std::to_string(count) +
                   " does not fit in the " + std::to_string(c.remaining()) +
                   " bytes left for the tensor table");
  f.tensors_.reserve(count);
  for (uint64_t i = 0; i < count; ++i) {
    const std::string entry = "tensor table entry " + std::to_string(i);
    QnatTensor t;
    const uint32_t name_len = c.read<uint32_t>(entry + " name length");
    if (name_len == 0 || name_len > kMaxNameBytes)
      fail(path, entry + ": name length " + std::to_string(name_len) + " is not in 1.." +
                     std::to_string(kMaxNameBytes));
    t.name = c.read_string(name_len, entry + " name");
    const uint32_t dtype = c.read<uint32_t>(entry + " dtype");
    if (!dense_scalar_code(dtype) && dtype != static_cast<uint32_t>(QnatDtype::kNF4) &&
        dtype != static_cast<uint32_t>(QnatDtype::kFP4))
      fail_tensor(path, t.name, "unknown dtype code " + std::to_string(dtype));
    t.dtype = static_cast<QnatDtype>(dtype);
    const uint32_t ndim = c.read<uint32_t>(entry + " rank");
    if (ndim > kMaxDims)
      fail_tensor(path, t.name,
                  "rank " + std::to_string(ndim) + " exceeds " + std::to_string(kMaxDims));
    for (uint32_t d = 0; d < ndim; ++d) {
      const uint64_t dim = c.read<uint64_t>(entry + " shape");
      if (dim > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
        fail_tensor(path, t.name, "negative dimension in its shape");
      t.shape.push_back(static_cast<int64_t>(dim));
    }
    t.offset = c.read<uint64_t>(entry + " offset");
    t.nbytes = c.read<uint64_t>(entry + " byte length");
    t.checksum = c.read<uint64_t>(entry + " checksum");
    const uint32_t qs_len = c.read<uint32_t>(entry + " quant-state reference length");
    if (qs_len > kMaxNameBytes)
      fail_tensor(path, t.name,
                  "quant-state reference length " + std::to_string(qs_len) + " exceeds " +
                      std::to_string(kMaxNameBytes));
    t.quant_state = c.read_string(qs_len, entry + " quant-state reference");
    if (!f.index_.emplace(t.name, f.tensors_.size()).second)
      fail_tensor(path, t.name, "appears twice in the tensor table");
    f.tensors_.push_back(std::move(t));
  }
  const uint64_t header_end = c.pos();
  const uint64_t stored_sum = c.read<uint64_t>("the header checksum");
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
  if (!meta.is_object()) fail(path, "metadata is not a JSON object");

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
    if (!numel) fail_tensor(path, t.name, "shape " + util::shape_str(t.shape) + " overflows");
    if (t.dtype != QnatDtype::kNF4 && t.dtype != QnatDtype::kFP4) {
      if (!t.quant_state.empty())
        fail_tensor(path, t.name, "a dense tensor with a quant-state reference");
      const uint64_t item = c10::elementSize(*dense_scalar_code(static_cast<uint32_t>(t.dtype)));
      if (*numel > std::numeric_limits<uint64_t>::max() / item || *numel * item != t.nbytes)
        fail_tensor(path, t.name,
                    std::string("byte length ") + std::to_string(t.nbytes) +
                        " does not match dtype " + qnat_dtype_name(t.dtype) + " and shape " +
                        util::shape_str(t.shape));
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
      if (a.dtype != *qnat_dense_dtype(dtype))
        fail_tensor(path, key,
                    std::string("is ") + qnat_dtype_name(a.dtype) + ", expected " +
                        qnat_scalar_name(dtype) + " (quant state of \"" + t.name + "\")");
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
      const auto storage = qnat_scalar_from_name(st.at("storage").get<std::string>());
      if (!storage) fail_tensor(path, t.name, "unknown packed storage dtype");
      const auto packed_shape = st.at("packed_shape").get<std::vector<int64_t>>();
      const auto pn = checked_numel(packed_shape);
      const uint64_t item = c10::elementSize(*storage);
      const uint64_t numel = *checked_numel(t.shape);
      const uint64_t need = (numel + 1) / 2;
      if (!pn || *pn * item != t.nbytes || t.nbytes < need || t.nbytes >= need + item)
        fail_tensor(path, t.name,
                    "byte length " + std::to_string(t.nbytes) + " does not match " +
                        qnat_dtype_name(t.dtype) + " shape " + util::shape_str(t.shape) + " (" +
                        std::to_string(need) + " packed bytes)");
      if (!qnat_scalar_from_name(st.at("dtype").get<std::string>()))
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
        if (!qnat_scalar_from_name(nested.at("dtype").get<std::string>()))
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

// ---- writing -------------------------------------------------------------------

void QnatWriter::push(QnatTensor info, const at::Tensor& tensor) {
  if (index_.count(info.name))
    throw QnatError("QNAT writer: tensor \"" + info.name + "\" added twice");
  Pending p;
  p.data = tensor.detach().to(at::kCPU).contiguous();
  info.nbytes = p.data.nbytes();
  info.checksum = qnat_checksum(p.data.data_ptr(), info.nbytes);
  p.info = std::move(info);
  index_[p.info.name] = pending_.size();
  pending_.push_back(std::move(p));
}

void QnatWriter::add(const std::string& name, const at::Tensor& tensor) {
  const auto code = qnat_dense_dtype(tensor.scalar_type());
  if (!code)
    throw QnatError("QNAT writer: tensor \"" + name + "\" has dtype " +
                    std::string(c10::toString(tensor.scalar_type())) + ", which QNAT cannot hold");
  QnatTensor info;
  info.name = name;
  info.dtype = *code;
  info.shape = tensor.sizes().vec();
  push(std::move(info), tensor);
}

void QnatWriter::add_packed(const std::string& name, const at::Tensor& packed, QnatDtype dtype,
                            const std::vector<int64_t>& logical_shape,
                            const std::string& quant_state) {
  TORCH_CHECK(dtype == QnatDtype::kNF4 || dtype == QnatDtype::kFP4, "QNAT writer: tensor \"", name,
              "\": add_packed takes nf4 or fp4");
  QnatTensor info;
  info.name = name;
  info.dtype = dtype;
  info.shape = logical_shape;
  info.quant_state = quant_state;
  push(std::move(info), packed);
}

bool QnatWriter::contains(const std::string& name) const { return index_.count(name) != 0; }

void QnatWriter::write(const std::string& path, const std::string& metadata_json,
                       uint32_t flags) const {
  std::vector<QnatTensor> table;
  table.reserve(pending_.size());
  for (const auto& p : pending_) table.push_back(p.info);
  // Offsets are fixed-width, so the header's size is known before they are.
  auto header_bytes = [&]() {
    std::string h = "QNAT";
    put32(h, kQnatVersion);
    put32(h, flags);
    put64(h, metadata_json.size());
    h += metadata_json;
    put64(h, table.size());
    for (const auto& t : table) {
      put_str(h, t.name);
      put32(h, static_cast<uint32_t>(t.dtype));
      put32(h, static_cast<uint32_t>(t.shape.size()));
      for (int64_t d : t.shape) put64(h, static_cast<uint64_t>(d));
      put64(h, t.offset);
      put64(h, t.nbytes);
      put64(h, t.checksum);
      put_str(h, t.quant_state);
    }
    put64(h, qnat_checksum(h.data(), h.size()));
    return h;
  };
  uint64_t offset = align_up(header_bytes().size());
  for (auto& t : table) {
    t.offset = offset;
    offset = align_up(offset + t.nbytes);
  }
  const std::string header = header_bytes();

  write_file_atomic(path, [&](std::ostream& out) {
    static const char zeros[kQnatAlignment] = {};
    out.write(header.data(), static_cast<std::streamsize>(header.size()));
    uint64_t pos = header.size();
    for (size_t i = 0; i < table.size(); ++i) {
      out.write(zeros, static_cast<std::streamsize>(table[i].offset - pos));
      out.write(static_cast<const char*>(pending_[i].data.data_ptr()),
                static_cast<std::streamsize>(table[i].nbytes));
      pos = table[i].offset + table[i].nbytes;
    }
  });
}

}  // namespace qlora::io
