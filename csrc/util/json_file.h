// Reading a whole JSON document from a file, with an error that names the
// file and the byte where parsing stopped.
#pragma once

#include <nlohmann/json.hpp>

#include <stdexcept>
#include <string>

namespace qlora::util {

// Throws std::runtime_error "<what> <path>: ..." when the file cannot be read
// or is not JSON; `what` says which file it is ("config.json", "tokenizer").
nlohmann::json read_json_file(const std::string& path, const std::string& what = "JSON file");

// j[key] as T; `fallback` when the key is missing or null. A value of the
// wrong type throws std::runtime_error naming `source` and the key.
template <typename T>
T json_field(const nlohmann::json& j, const std::string& source, const char* key, T fallback) {
  if (!j.contains(key) || j.at(key).is_null()) return fallback;
  try {
    return j.at(key).get<T>();
  } catch (const nlohmann::json::exception& e) {
    throw std::runtime_error(source + ": key \"" + key + "\" has the wrong type (" + e.what() +
                             ")");
  }
}

}  // namespace qlora::util
