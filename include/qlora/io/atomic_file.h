// Crash-safe file replacement and read-only file mapping.
//
// Checkpoints are rewritten in place during training; a crash or a full disk
// halfway through must leave either the old file or the new one, never a torn
// mix. Readers that hold a MappedFile keep seeing the old contents after a
// replacement, because rename() swaps the directory entry, not the inode.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <ostream>
#include <string>

namespace qlora::io {

// Streams the new contents through `writer` into a temporary file next to
// `path` ("<path>.tmp.<pid>.<random>"), fsync()s it, renames it over `path`
// and fsync()s the directory so the rename itself survives a power loss.
// If `writer` or any step throws, the temporary file is removed, `path` is
// left untouched and the exception propagates. I/O failures throw
// std::system_error whose message names the file and the OS error. Only if
// the final directory fsync fails is the new file already in place when the
// error is thrown.
void write_file_atomic(const std::string& path, const std::function<void(std::ostream&)>& writer);

void write_bytes_atomic(const std::string& path, const void* data, size_t n);

// A whole regular file mapped into memory. Non-copyable and non-movable so
// that a std::shared_ptr<const MappedFile> can be handed to tensors viewing
// the bytes: the mapping lives until the last view is gone.
//
// The mapping is private and copy-on-write: writes through data() (for
// example an in-place op on a zero-copy tensor) stay in this process and
// never reach the file. Truncating the file on disk while it is mapped makes
// later reads of the lost pages raise SIGBUS, as with any mmap; replace files
// with write_file_atomic instead.
class MappedFile {
 public:
  // Throws std::system_error naming `path` if it cannot be opened, is not a
  // regular file or cannot be mapped. Empty files are not mapped (mmap
  // rejects length 0); data() is then nullptr.
  explicit MappedFile(std::string path);
  ~MappedFile();

  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const uint8_t* data() const { return data_; }
  uint8_t* mutable_data() const { return data_; }
  // Lets the kernel drop the pages lying wholly inside [offset, offset + length)
  // from this process (MADV_DONTNEED): they stop counting in its RSS and are read
  // from the file again if touched. Pages written through mutable_data() would
  // lose those writes: call it only for ranges no tensor view writes to. A hint:
  // errors are ignored.
  void drop_pages(size_t offset, size_t length) const;
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

}  // namespace qlora::io
