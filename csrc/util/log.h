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
// Opens the log files again by name: after their folder was removed and made
// again, later messages land in the new folder rather than in unlinked files.
void reopen_files();
// A data-parallel worker other than rank 0: messages carry "[rank N]" and
// only warnings and errors are shown (rank 0 reports the run).
void set_worker_rank(int rank);

}  // namespace qlora::log
