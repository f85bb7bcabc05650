// Raw-file helpers shared by the standalone, torch-free test harnesses
// (kquant_harness.cpp, quant_mix_harness.cpp) that tests/python builds with
// g++ directly: whole files of little-endian float32 values in, bytes out.
#pragma once

#include <cstddef>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

namespace qlora::test_harness {

// Reads the whole of `path` as float32 values; false when the file cannot be
// read or its size is not a whole number of floats.
inline bool read_floats(const std::string& path, std::vector<float>* out) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return false;
  const std::vector<char> raw((std::istreambuf_iterator<char>(in)),
                              std::istreambuf_iterator<char>());
  if (raw.size() % sizeof(float) != 0) return false;
  out->resize(raw.size() / sizeof(float));
  std::memcpy(out->data(), raw.data(), raw.size());
  return true;
}

// Writes `size` bytes at `data` to `path`, replacing it; false on failure.
inline bool write_bytes(const std::string& path, const void* data, size_t size) {
  std::ofstream out(path, std::ios::binary);
  out.write(static_cast<const char*>(data), static_cast<std::streamsize>(size));
  return static_cast<bool>(out);
}

}  // namespace qlora::test_harness
