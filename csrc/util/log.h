// Logging through spdlog. spdlog (Debian's, built on Debian's fmt) is kept
// behind this plain-string interface in a translation unit that sees no
// LibTorch header, because the torch wheel ships its own, newer fmt headers.
#pragma once

#include <string>

namespace qlora::log {

void info(const std::string& message);
void warn(const std::string& message);
void error(const std::string& message);
// Also append every message to `path` (the run's log file).
void add_file(const std::string& path);

}  // namespace qlora::log
