// Small helpers shared by the GoogleTest files.
#pragma once

#include <gtest/gtest.h>

#include <stdlib.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace qlora::test {

// A whole file's bytes ("" if it cannot be read: the assertion that follows says what differs).
inline std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}
// Replaces a file's bytes (fixtures and corruption tests; not atomic on purpose).
inline void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
}

// Runs f and checks that it throws an exception whose message contains
// `expected` (the test of an error is the message a user will read).
template <typename F>
void expect_error(F&& f, const std::string& expected) {
  try {
    std::forward<F>(f)();
  } catch (const std::exception& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find(expected), std::string::npos)
        << "error message does not contain \"" << expected << "\":\n"
        << what;
    return;
  }
  ADD_FAILURE() << "expected an error containing \"" << expected << "\", but nothing was thrown";
}

// A scratch directory, removed with the files written through it.
class TempDir {
 public:
  TempDir() {
    char pattern[] = "/tmp/qlora_test_XXXXXX";
    const char* made = mkdtemp(pattern);
    if (made == nullptr) throw std::runtime_error("mkdtemp failed");
    path_ = made;
  }
  ~TempDir() {
    for (const std::string& f : files_) std::remove(f.c_str());
    rmdir(path_.c_str());
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::string write(const std::string& name, const std::string& content) {
    const std::string file = path_ + "/" + name;
    std::ofstream(file, std::ios::binary) << content;
    files_.push_back(file);
    return file;
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  std::vector<std::string> files_;
};

}  // namespace qlora::test
