// Reading and writing the safetensors checkpoint format
// (https://github.com/huggingface/safetensors): an 8-byte little-endian
// header length N, N bytes of JSON describing every tensor, then the raw
// little-endian tensor bytes packed back to back.
//
// Files written here are byte-identical to those of safetensors 0.8.0's
// `safetensors.torch.save_file` for the same tensors (Python orders metadata
// entries randomly, so with two or more metadata entries only the contents
// match). Reading is at least as strict as that library: every file it would
// reject is rejected here, with a message naming the file, the tensor or key,
// and what was expected.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace qlora::io {

class MappedFile;

// A malformed file, a missing tensor or a tensor that cannot be saved.
// (Failures of the OS calls themselves surface as std::system_error.)
class SafetensorsError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct TensorInfo {
  std::string name;
  at::ScalarType dtype;
  std::vector<int64_t> shape;
  // Byte offsets relative to the start of the data section (after the header).
  uint64_t begin = 0;
  uint64_t end = 0;
};

// The format's dtype names are exactly those safetensors.torch maps to torch
// dtypes: F64 F32 F16 BF16 C64 I64 I32 I16 I8 U64 U32 U16 U8 BOOL F8_E4M3
// F8_E5M2 F8_E4M3FNUZ F8_E5M2FNUZ. Both throw SafetensorsError otherwise.
const char* safetensors_dtype_name(at::ScalarType dtype);
at::ScalarType scalar_type_from_safetensors(const std::string& name);

// A validated, memory-mapped safetensors file. Cheap to copy: copies share
// the mapping.
class SafetensorsReader {
 public:
  static SafetensorsReader open(const std::string& path);

  const std::string& path() const;
  // Sorted by data offset, the order the bytes lie in the file.
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  std::vector<std::string> names() const;
  bool contains(const std::string& name) const { return index_.count(name) != 0; }
  // Throws SafetensorsError naming the file and `name`, with close matches.
  const TensorInfo& info(const std::string& name) const;

  // A CPU tensor. By default it views the mapped file without copying and
  // keeps the mapping alive on its own, so it outlives this reader. The
  // mapping is copy-on-write: an in-place op on the view never reaches the
  // file, but later zero-copy get()s of the same tensor from this reader (or
  // its copies) do see it; pass copy=true for an independent tensor. Data
  // not aligned to its element size (possible in files from other writers)
  // is always copied.
  at::Tensor get(const std::string& name, bool copy = false) const;
  std::map<std::string, at::Tensor> load_all(bool copy = true) const;
  // Drops the tensor's mapped pages from this process's memory once a copy
  // of it is all that is kept (a loader that converts tensor by tensor stays
  // at one tensor of the file resident). No zero-copy view of it may have
  // been written to: those writes would be lost.
  void release(const std::string& name) const;

  // The "__metadata__" entry, empty when absent.
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  SafetensorsReader() = default;

  std::shared_ptr<const MappedFile> file_;
  uint64_t data_start_ = 0;  // file offset of the data section
  std::vector<TensorInfo> tensors_;
  std::unordered_map<std::string, size_t> index_;  // name -> position in tensors_
  std::map<std::string, std::string> metadata_;
};

// Writes `tensors` (any device, layout-strided, possibly non-contiguous)
// atomically to `path` with write_file_atomic; tensors are copied to the CPU
// one at a time while writing. Rejects empty or duplicate names and dtypes
// the format cannot hold. An empty `metadata` writes no "__metadata__" entry.
void save_safetensors(const std::string& path,
                      const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata = {});
void save_safetensors(const std::string& path, const std::map<std::string, at::Tensor>& tensors,
                      const std::map<std::string, std::string>& metadata = {});

// A checkpoint that is either one safetensors file or several shards listed
// by a Hugging Face "*.safetensors.index.json" ({"weight_map": {tensor name:
// shard file name relative to the index}}). Only the tensors in the weight
// map are visible; TensorInfo offsets are relative to the tensor's own shard.
class ShardedSafetensors {
 public:
  // `path` is a .safetensors file or an index ending in ".json". Opening an
  // index validates every shard and checks that each mapped tensor is in
  // the shard the index names.
  static ShardedSafetensors open(const std::string& path);

  const std::string& path() const { return path_; }
  // Shard by shard (ordered by file name), by data offset within a shard.
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  std::vector<std::string> names() const;
  bool contains(const std::string& name) const { return shard_of_.count(name) != 0; }
  const TensorInfo& info(const std::string& name) const;
  at::Tensor get(const std::string& name, bool copy = false) const;
  std::map<std::string, at::Tensor> load_all(bool copy = true) const;
  void release(const std::string& name) const;  // SafetensorsReader::release
  const std::vector<SafetensorsReader>& shards() const { return shards_; }

 private:
  ShardedSafetensors() = default;
  const SafetensorsReader& shard_of(const std::string& name) const;

  std::string path_;
  std::vector<SafetensorsReader> shards_;
  std::unordered_map<std::string, size_t> shard_of_;  // name -> position in shards_
  std::vector<TensorInfo> tensors_;
};

// Opens `dir`/model.safetensors.index.json if present, else
// `dir`/model.safetensors; throws SafetensorsError naming the directory and
// both file names when neither exists.
ShardedSafetensors open_checkpoint_dir(const std::string& dir);

}  // namespace qlora::io
