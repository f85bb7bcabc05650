#include "fuzz_support.h"

#include <sys/stat.h>
#include <unistd.h>

#include <fstream>

namespace qlora::fuzz {

const std::string& scratch_dir() {
  static const std::string dir = [] {
    struct stat st {};
    const std::string base =
        stat("/dev/shm", &st) == 0 && S_ISDIR(st.st_mode) ? "/dev/shm" : "/tmp";
    std::string d = base + "/qlora-fuzz-" + std::to_string(getpid());
    mkdir(d.c_str(), 0700);
    return d;
  }();
  return dir;
}

std::string write_scratch(const std::string& name, const uint8_t* data, size_t size) {
  const std::string path = scratch_dir() + "/" + name;
  // One level of sub-folder: the targets whose parser looks for sibling files.
  if (const size_t slash = name.find('/'); slash != std::string::npos)
    mkdir((scratch_dir() + "/" + name.substr(0, slash)).c_str(), 0700);
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
  out.close();
  if (!out) finding("cannot write the scratch file", path);
  return path;
}

std::string write_scratch(const std::string& name, std::string_view text) {
  return write_scratch(name, reinterpret_cast<const uint8_t*>(text.data()), text.size());
}

void finding(const std::string& what, const std::string& detail) {
  std::fprintf(stderr, "qlora fuzz finding: %s\n  %s\n", what.c_str(), detail.c_str());
  std::abort();
}

}  // namespace qlora::fuzz
