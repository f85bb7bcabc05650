// `qlora inspect FILE`: what a checkpoint holds, without loading a model.
#pragma once

#include <ostream>
#include <string>

namespace qlora::cli {

int inspect(const std::string& path, std::ostream& out);

}  // namespace qlora::cli
