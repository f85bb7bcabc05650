// QNAT: qlora-cpp's native, lossless, mmap-friendly container for a
// quantised LlamaForCausalLM (4-bit bases exactly as stored, with their
// quantisation state) and, optionally, its LoRA adapter. The byte layout is
// specified in docs/QNAT.md.
//
// save_qnat writes what the model holds, bit for bit (packed NF4/FP4 bytes,
// uint8 absmax and nested state when double-quantised, quant maps, dense
// parameters, LoRA A/B/magnitude); load_qnat rebuilds the same model without
// re-quantising anything.
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

#include "qlora/models/llama.h"
#include "qlora/nn/lora_config.h"

namespace qlora::io {

class MappedFile;

// A malformed, truncated or corrupted QNAT file, or a model it cannot hold.
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

// What save_qnat records besides the model itself.
struct QnatMetadata {
  // Where the tokenizer comes from (a tokenizer.json / .model / .gguf path or
  // a Hugging Face folder) and, optionally, its kind ("hf-json",
  // "sentencepiece", "gguf"): informative, stored as given.
  std::string tokenizer_source;
  std::string tokenizer_kind;
  // The adapter's configuration as trained (target rules included); each
  // LoRA layer's own r/alpha/... are always recorded per layer.
  std::optional<nn::LoRAConfig> lora;
  // The quantisation the bases were made with (informative: every 4-bit
  // layer records its own quantisation state).
  std::optional<nn::QuantizedBaseConfig> quantization;
  // false: leave LoRA tensors out (flag bit 0 clear); load_qnat then gives
  // every LoRA layer a fresh no-op adapter (B = 0).
  bool include_adapter = true;
  // A JSON object stored verbatim under "extra" ("" = none).
  std::string extra_json;
};

// Writes `model` to `path` atomically (write_file_atomic). Tensors on any
// device are copied to the CPU; the model is not modified.
void save_qnat(const std::string& path, models::LlamaForCausalLMImpl& model,
               const QnatMetadata& metadata = {});
inline void save_qnat(const std::string& path, models::LlamaForCausalLM& model,
                      const QnatMetadata& metadata = {}) {
  save_qnat(path, *model, metadata);
}

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
// inside the data section and non-overlapping, quant-state references
// resolvable). With `verify_checksums` (the default) it also checks every
// tensor's checksum; otherwise verify() / tensor(name, true) check on demand.
class QnatFile {
 public:
  static QnatFile open(const std::string& path, bool verify_checksums = true);

  const std::string& path() const;
  uint32_t version() const { return version_; }
  uint32_t flags() const { return flags_; }
  bool has_adapter() const { return (flags_ & kQnatFlagHasAdapter) != 0; }
  const std::string& metadata_json() const { return metadata_json_; }
  // The model config, parsed from metadata "model_config".
  const models::LlamaConfig& config() const { return config_; }
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
  models::LlamaConfig config_;
  std::vector<QnatTensor> tensors_;
  std::map<std::string, size_t> index_;
  // Per nf4/fp4 tensor: the packed storage dtype and shape.
  std::map<std::string, std::pair<at::ScalarType, std::vector<int64_t>>> packed_;
};

struct QnatLoadOptions {
  c10::Device device = at::kCPU;
  // true: frozen tensors (4-bit bases, dense frozen weights) stay zero-copy
  // views of the (private, copy-on-write) mapping; trainable parameters are
  // always copied. false: everything is copied into fresh memory.
  bool zero_copy = true;
  bool verify_checksums = true;
};

// Builds the model `path` holds: QLoRALinear layers from the packed weights
// and their QuantState (never re-quantised), LoRALinear / plain Linear layers
// as saved, LoRA weights restored when the file has an adapter, requires_grad
// as saved. Returns it in eval mode. Errors (QnatError) name the file and the
// tensor.
models::LlamaForCausalLM load_qnat(const std::string& path, const QnatLoadOptions& options = {},
                                   QnatMetadata* metadata = nullptr);

}  // namespace qlora::io
