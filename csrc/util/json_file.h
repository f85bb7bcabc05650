// Reading a whole JSON document from a file, with an error that names the
// file and the byte where parsing stopped.
#pragma once

#include <nlohmann/json.hpp>

#include <string>

namespace qlora::util {

// Throws std::runtime_error "<what> <path>: ..." when the file cannot be read
// or is not JSON; `what` says which file it is ("config.json", "tokenizer").
nlohmann::json read_json_file(const std::string& path, const std::string& what = "JSON file");

}  // namespace qlora::util
