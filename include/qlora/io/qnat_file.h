// QNAT, the container: a header, a JSON metadata block, a table of named
// tensors (dense dtypes and packed NF4/FP4) with XXH64 checksums, and 64-byte
// aligned data. It knows no models: what the metadata says about a model, and
// which tensors make one, is models/qnat.h's business. The byte layout is
// specified in docs/QNAT.md.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace qlora::io {

class MappedFile;

// A malformed, truncated or corrupted QNAT file, or data it cannot hold.
// Messages name the file and, where one is involved, the tensor.
class QnatError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

constexpr uint32_t kQnatVersion = 1;
constexpr uint32_t kQnatFlagHasAdapter = 1u << 0;
constexpr uint64_t kQnatAlignment = 64;

// XXH64 (seed 0) of `n` bytes: the checksum of every tensor and of the header.
uint64_t qnat_checksum(const void* data, size_t n);

enum class QnatDtype : uint32_t {
  kF32 = 0,
  kF16 = 1,
  kBF16 = 2,
  kF64 = 3,
  kI64 = 4,
  kI32 = 5,
  kI16 = 6,
  kI8 = 7,
  kU8 = 8,
  kBool = 9,
  kNF4 = 16,  // packed 4-bit, bitsandbytes layout; see QnatTensor::quant_state
  kFP4 = 17,
};
const char* qnat_dtype_name(QnatDtype dtype);
// The QNAT code of a dense torch dtype, and back; nullopt where QNAT has none.
std::optional<QnatDtype> qnat_dense_dtype(at::ScalarType scalar);
std::optional<at::ScalarType> qnat_scalar_type(QnatDtype dtype);
// A dense dtype by its QNAT name ("f32", "u8", ...), as the metadata spells it.
std::optional<at::ScalarType> qnat_scalar_from_name(const std::string& name);
// The QNAT name of a dense torch dtype ("?" where QNAT has none).
std::string qnat_scalar_name(at::ScalarType scalar);

struct QnatTensor {
  std::string name;
  QnatDtype dtype;
  // Logical shape: for nf4/fp4 the shape of the dequantised weight.
  std::vector<int64_t> shape;
  uint64_t offset = 0;  // absolute, from the start of the file; 64-byte aligned
  uint64_t nbytes = 0;
  uint64_t checksum = 0;  // qnat_checksum of the nbytes bytes
  // nf4/fp4 only: the key of its record under metadata "quant_states" (the
  // names of its absmax / quant-map / nested tensors and the scalars).
  std::string quant_state;
};

// A validated, memory-mapped QNAT file. Cheap to copy (copies share the
// mapping). open() checks the header (magic, version, flags, lengths, header
// checksum), parses the metadata JSON and validates the whole tensor table
// (names unique, dtypes known, byte length == dtype x shape, offsets aligned,
// inside the data section and non-overlapping, quant-state records complete).
// With `verify_checksums` (the default) it also checks every tensor's
// checksum; otherwise verify() / tensor(name, true) check on demand.
class QnatFile {
 public:
  static QnatFile open(const std::string& path, bool verify_checksums = true);

  const std::string& path() const;
  uint32_t version() const { return version_; }
  uint32_t flags() const { return flags_; }
  bool has_adapter() const { return (flags_ & kQnatFlagHasAdapter) != 0; }
  // The metadata block, a JSON object (checked on open).
  const std::string& metadata_json() const { return metadata_json_; }
  const std::vector<QnatTensor>& tensors() const { return tensors_; }
  bool contains(const std::string& name) const { return index_.count(name) != 0; }
  const QnatTensor& info(const std::string& name) const;

  // Throws QnatError naming the file and tensor on a checksum mismatch.
  void verify(const std::string& name) const;
  void verify_all() const;

  // A zero-copy CPU view of the mapped bytes (kept alive by the tensor), in
  // its stored dtype and shape; nf4/fp4 tensors come back as their packed
  // storage (dtype and shape from their quant-state record).
  at::Tensor tensor(const std::string& name, bool verify_checksum = false) const;

 private:
  QnatFile() = default;
  std::shared_ptr<const MappedFile> file_;
  uint32_t version_ = 0, flags_ = 0;
  std::string metadata_json_;
  std::vector<QnatTensor> tensors_;
  std::map<std::string, size_t> index_;
  // Per nf4/fp4 tensor: the packed storage dtype and shape.
  std::map<std::string, std::pair<at::ScalarType, std::vector<int64_t>>> packed_;
};

// Collects named tensors, then writes them as one QNAT file, atomically.
// Tensors are copied to the CPU when added; offsets and checksums are the
// writer's job.
class QnatWriter {
 public:
  // A dense tensor, stored in its own dtype (QnatError if QNAT has no code).
  void add(const std::string& name, const at::Tensor& tensor);
  // A packed 4-bit tensor: `packed` is its storage as held in memory,
  // `logical_shape` the dequantised weight's, `quant_state` the key of its
  // record under metadata "quant_states".
  void add_packed(const std::string& name, const at::Tensor& packed, QnatDtype dtype,
                  const std::vector<int64_t>& logical_shape, const std::string& quant_state);
  bool contains(const std::string& name) const;

  // Writes header, `metadata_json` (a JSON object) and the tensors to `path`
  // with write_file_atomic.
  void write(const std::string& path, const std::string& metadata_json, uint32_t flags) const;

 private:
  struct Pending {
    QnatTensor info;
    at::Tensor data;  // CPU, contiguous
  };
  std::vector<Pending> pending_;
  std::map<std::string, size_t> index_;
  void push(QnatTensor info, const at::Tensor& tensor);
};

}  // namespace qlora::io
