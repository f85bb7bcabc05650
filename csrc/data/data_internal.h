// Helpers shared by the csrc/data files; not installed.
#pragma once

#include <cstdint>
#include <random>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "qlora/data.h"

namespace qlora::data::detail {

// Where readers send malformed-record reports: collected under kSkip, thrown under kReject.
class IssueSink {
 public:
  IssueSink(std::string file, Strictness strictness, std::vector<DataIssue>* out)
      : file_(std::move(file)), strictness_(strictness), out_(out) {}

  void report(int64_t line, std::string message);
  const std::string& file() const { return file_; }

 private:
  std::string file_;
  Strictness strictness_;
  std::vector<DataIssue>* out_;
};

struct Line {
  std::string_view text;  // without the line break (and without a '\r' before it)
  int64_t number;         // 1-based
};
std::vector<Line> split_lines(std::string_view content);

// The whole file; throws DataError naming the path and the OS error.
std::string read_file(const std::string& path);
// Drops a UTF-8 byte order mark, which editors on some platforms put first.
std::string_view strip_bom(std::string_view content);
bool is_blank(std::string_view text);

// Finalisers that turn nearby integers into unrelated 64-bit values (SplitMix64).
uint64_t splitmix64(uint64_t x);
uint64_t mix_seed(uint64_t seed, uint64_t stream);

// Fisher-Yates on `items` in place, as shuffled_indices documents.
template <typename T>
void fisher_yates(std::vector<T>& items, std::mt19937_64& rng) {
  for (size_t i = items.size(); i > 1; --i) {
    const size_t j = static_cast<size_t>(uniform_below(rng, i));
    std::swap(items[i - 1], items[j]);
  }
}

}  // namespace qlora::data::detail
