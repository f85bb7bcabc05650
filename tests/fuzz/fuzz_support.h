// What every fuzz target shares: scratch files for the parsers that take a
// path, and the one rule a parser must keep on any input: succeed, or throw
// an exception whose message names what it read. A crash, a sanitizer
// report, an abort, or an out-of-memory is a finding.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <new>
#include <string>
#include <string_view>

namespace qlora::fuzz {

// A folder private to this process (on /dev/shm when it exists: the file
// parsers mmap their input, and a RAM disk keeps 10^6 runs off the disk).
const std::string& scratch_dir();
// Writes `size` bytes to scratch_dir()/name ("folder/file" makes the folder),
// replacing it; returns the path.
std::string write_scratch(const std::string& name, const uint8_t* data, size_t size);
std::string write_scratch(const std::string& name, std::string_view text);

// Reports a broken rule and aborts, so that libFuzzer keeps the input.
[[noreturn]] void finding(const std::string& what, const std::string& detail);

// Runs f. A refusal (an exception) must name `must_name` (a path, a source
// label) so a user knows which file was bad; std::bad_alloc is never a
// refusal: a header asking for 2^64 bytes must be rejected before any
// allocation is attempted.
template <typename F>
void expect_refusal_or_success(const std::string& must_name, F&& f) {
  try {
    f();
  } catch (const std::bad_alloc&) {
    finding("std::bad_alloc: an allocation sized by the input was attempted", must_name);
  } catch (const std::exception& e) {
    const std::string what = e.what();
    if (!must_name.empty() && what.find(must_name) == std::string::npos)
      finding("error message does not name \"" + must_name + "\"", what);
  }
}

}  // namespace qlora::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);
