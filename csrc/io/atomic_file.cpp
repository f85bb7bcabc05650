#include "qlora/io/atomic_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <random>
#include <streambuf>
#include <system_error>
#include <vector>

#include "util/fs.h"

namespace qlora::io {
namespace {

[[noreturn]] void throw_errno(int err, const std::string& what, const std::string& path) {
  throw std::system_error(err, std::generic_category(), what + " '" + path + "'");
}

// Writes all of [data, data + n), retrying the short writes and EINTRs that
// write(2) is allowed to return. Returns 0 or the errno of the failure.
int write_fully(int fd, const char* data, size_t n) {
  while (n > 0) {
    const ssize_t w = ::write(fd, data, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    data += w;
    n -= static_cast<size_t>(w);
  }
  return 0;
}

// std::ostream has no portable way to wrap a file descriptor, and we need the
// descriptor itself for fsync(). A failed write makes the stream bad (as
// ofstream does) and keeps the errno so the caller can report the real cause.
class FdStreambuf : public std::streambuf {
 public:
  explicit FdStreambuf(int fd) : fd_(fd), buffer_(kBufferSize) {
    setp(buffer_.data(), buffer_.data() + buffer_.size());
  }

  int error() const { return error_; }

 protected:
  int_type overflow(int_type ch) override {
    if (flush_buffer() != 0) return traits_type::eof();
    if (!traits_type::eq_int_type(ch, traits_type::eof())) {
      *pptr() = traits_type::to_char_type(ch);
      pbump(1);
    }
    return traits_type::not_eof(ch);
  }

  // Large blocks (tensor payloads) bypass the buffer instead of being copied
  // through it in 1 MiB pieces.
  std::streamsize xsputn(const char* s, std::streamsize n) override {
    if (n < static_cast<std::streamsize>(epptr() - pptr())) return std::streambuf::xsputn(s, n);
    if (flush_buffer() != 0) return 0;
    error_ = write_fully(fd_, s, static_cast<size_t>(n));
    return error_ == 0 ? n : 0;
  }

  int sync() override { return flush_buffer() == 0 ? 0 : -1; }

 private:
  static constexpr size_t kBufferSize = size_t{1} << 20;

  int flush_buffer() {
    if (error_ != 0) return error_;
    error_ = write_fully(fd_, pbase(), static_cast<size_t>(pptr() - pbase()));
    setp(buffer_.data(), buffer_.data() + buffer_.size());
    return error_;
  }

  int fd_;
  int error_ = 0;
  std::vector<char> buffer_;
};

std::string random_suffix() {
  std::random_device rd;
  char buf[32];
  std::snprintf(buf, sizeof(buf), ".tmp.%ld.%08x", static_cast<long>(::getpid()), rd());
  return buf;
}

// Creates the temporary file exclusively so that two writers racing on the
// same destination can never share (and corrupt) one temporary file.
int create_temp_file(const std::string& path, std::string* tmp_path) {
  constexpr int kAttempts = 16;
  for (int i = 0; i < kAttempts; ++i) {
    *tmp_path = path + random_suffix();
    // 0666 filtered by the umask: the same permissions std::ofstream gives.
    const int fd = ::open(tmp_path->c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (fd >= 0) return fd;
    if (errno != EEXIST) throw_errno(errno, "cannot create temporary file", *tmp_path);
  }
  throw_errno(EEXIST, "cannot create a unique temporary file for", path);
}

// Owns the temporary file until it has been renamed over the destination.
class TempFile {
 public:
  // path_ is declared before fd_, so it exists when create_temp_file fills it.
  explicit TempFile(const std::string& path) : fd_(create_temp_file(path, &path_)) {}
  ~TempFile() {
    close_fd();
    if (!committed_) ::unlink(path_.c_str());
  }
  TempFile(const TempFile&) = delete;
  TempFile& operator=(const TempFile&) = delete;

  int fd() const { return fd_; }

  void sync_and_close() {
    if (::fsync(fd_) != 0) throw_errno(errno, "cannot fsync", path_);
    const int rc = close_fd();
    if (rc != 0) throw_errno(errno, "cannot close", path_);
  }

  // A failure to fsync the folder after the rename leaves nothing to undo:
  // the temporary name is gone either way.
  void rename_to(const std::string& dest) {
    fs::rename_durably(path_, dest);
    committed_ = true;
  }

 private:
  int close_fd() {
    if (fd_ < 0) return 0;
    const int rc = ::close(fd_);
    fd_ = -1;
    return rc;
  }

  std::string path_;
  int fd_ = -1;
  bool committed_ = false;
};

}  // namespace

void write_file_atomic(const std::string& path, const std::function<void(std::ostream&)>& writer) {
  TempFile tmp(path);
  FdStreambuf buf(tmp.fd());
  std::ostream os(&buf);
  writer(os);
  os.flush();
  if (!os) {
    throw_errno(buf.error() != 0 ? buf.error() : EIO, "cannot write the temporary file for", path);
  }
  tmp.sync_and_close();
  tmp.rename_to(path);
}

void write_bytes_atomic(const std::string& path, const void* data, size_t n) {
  write_file_atomic(path, [&](std::ostream& os) {
    os.write(static_cast<const char*>(data), static_cast<std::streamsize>(n));
  });
}

void MappedFile::drop_pages(size_t offset, size_t length) const {
  if (data_ == nullptr || offset >= size_ || length == 0) return;
  const auto page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
  const size_t begin = (offset + page - 1) / page * page;  // first whole page
  const size_t end = std::min(size_, offset + length) / page * page;
  if (end > begin) (void)::madvise(data_ + begin, end - begin, MADV_DONTNEED);
}

MappedFile::MappedFile(std::string path) : path_(std::move(path)) {
  const int fd = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw_errno(errno, "cannot open", path_);
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    throw_errno(err, "cannot stat", path_);
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    throw_errno(S_ISDIR(st.st_mode) ? EISDIR : EINVAL, "cannot map non-regular file", path_);
  }
  size_ = static_cast<size_t>(st.st_size);
  if (size_ > 0) {
    // PROT_WRITE with MAP_PRIVATE is copy-on-write: it costs nothing until a
    // page is written, and turns an in-place op on a zero-copy tensor into a
    // private copy instead of a SIGSEGV. The file itself is opened read-only.
    void* p = ::mmap(nullptr, size_, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      const int err = errno;
      ::close(fd);
      throw_errno(err, "cannot mmap", path_);
    }
    data_ = static_cast<uint8_t*>(p);
  }
  // The mapping holds its own reference to the file.
  ::close(fd);
}

MappedFile::~MappedFile() {
  if (data_ != nullptr) ::munmap(data_, size_);
}

}  // namespace qlora::io
