// A bounds-checked little-endian reader over bytes in memory (a mapped file),
// shared by the binary container parsers. Every read checks the bytes left
// first; the description of what is read is only built for the error.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

namespace qlora::util {

// `Fail` is a [[noreturn]] callable taking the error message; each format
// wraps it in its own exception type and file label.
template <typename Fail>
class ByteCursor {
 public:
  ByteCursor(const uint8_t* data, uint64_t size, Fail fail)
      : data_(data), size_(size), fail_(std::move(fail)) {}

  uint64_t pos() const { return pos_; }
  uint64_t size() const { return size_; }
  uint64_t remaining() const { return size_ - pos_; }
  const uint8_t* here() const { return data_ + pos_; }

  template <typename What>
  void need(uint64_t n, const What& what) const {
    if (n > remaining()) {
      fail_("truncated file: " + describe(what) + " needs " + std::to_string(n) +
            " bytes at offset " + std::to_string(pos_) + ", but only " +
            std::to_string(remaining()) + " remain");
    }
  }

  template <typename T, typename What>
  T read(const What& what) {
    static_assert(std::is_trivially_copyable_v<T>);
    need(sizeof(T), what);
    T v;
    std::memcpy(&v, data_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }

  template <typename What>
  void read_bytes(uint64_t n, void* out, const What& what) {
    need(n, what);
    if (n > 0) std::memcpy(out, data_ + pos_, n);
    pos_ += n;
  }

  template <typename What>
  std::string read_string(uint64_t n, const What& what) {
    need(n, what);
    std::string s(reinterpret_cast<const char*>(data_ + pos_), n);
    pos_ += n;
    return s;
  }

  template <typename What>
  void skip(uint64_t n, const What& what) {
    need(n, what);
    pos_ += n;
  }

 private:
  static std::string describe(const std::string& what) { return what; }
  static std::string describe(const char* what) { return what; }
  template <typename F, typename = std::enable_if_t<std::is_invocable_v<const F&>>>
  static std::string describe(const F& what) {
    return what();
  }

  const uint8_t* data_;
  uint64_t size_;
  uint64_t pos_ = 0;
  Fail fail_;
};

}  // namespace qlora::util
