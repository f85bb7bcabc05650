// Reading a tokenizer JSON file into nlohmann::json (see json_node.h).
#include "tokenizers/json_node.h"

#include <system_error>

#include "util/fs.h"
#include "util/strings.h"

namespace qlora::tokenizers::detail {

namespace {

// fs::read_file with the tokenizers' messages: "cannot open: <reason>" when open(2) fails,
// "read failed" for a failure after it.
std::string read_file(const std::string& path) {
  try {
    return fs::read_file(path);
  } catch (const std::system_error& e) {
    if (util::starts_with(e.what(), "cannot open ")) {
      throw TokenizerError(path + ": cannot open: " + e.code().message());
    }
    throw TokenizerError(path + ": read failed");
  }
}

}  // namespace

json parse_json_file(const std::string& path) {
  const std::string text = read_file(path);
  try {
    return json::parse(text);
  } catch (const json::exception& e) {  // out_of_range too: "1e999"
    throw TokenizerError(path + ": not valid JSON: " + e.what());
  }
}

}  // namespace qlora::tokenizers::detail
