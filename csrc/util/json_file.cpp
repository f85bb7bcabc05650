#include "util/json_file.h"

#include <stdexcept>

#include "util/fs.h"

namespace qlora::util {

nlohmann::json read_json_file(const std::string& path, const std::string& what) {
  const std::string text = fs::read_file(path);
  try {
    return nlohmann::json::parse(text);
  } catch (const nlohmann::json::parse_error& e) {
    throw std::runtime_error(what + " \"" + path + "\" is not valid JSON (byte " +
                             std::to_string(e.byte) + "): " + e.what());
  } catch (const nlohmann::json::exception& e) {
    // A number beyond double's range ("1e999") is out_of_range, not parse_error.
    throw std::runtime_error(what + " \"" + path + "\" is not valid JSON: " + e.what());
  }
}

}  // namespace qlora::util
