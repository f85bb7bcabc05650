// String helpers every reader and writer shares.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace qlora::util {

inline bool starts_with(std::string_view s, std::string_view prefix) {
  return s.size() >= prefix.size() && s.compare(0, prefix.size(), prefix) == 0;
}

inline bool ends_with(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// "[2, 3]": a shape as error messages print it.
std::string shape_str(const std::vector<int64_t>& shape);

}  // namespace qlora::util
