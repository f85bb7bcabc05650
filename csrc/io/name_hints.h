// Text for the file readers' error messages: "did you mean ...?" hints for
// missing tensor and key names.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace qlora::io {

// "; did you mean 'a' or 'b'?" for up to three names within a few typos of
// `name`, or differing from it by a leading module prefix ("model."); "" if
// none is close.
std::string close_names_hint(const std::string& name, const std::vector<std::string>& names);

}  // namespace qlora::io
