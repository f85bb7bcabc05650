#pragma once

#include <functional>
#include <string>

namespace qlora::train::detail {

// Runs `write`, which puts `what` into output_dir. A training run exists only
// in memory until it is written, so a folder removed under it (before the
// write or during it) is created again with a warning and the write runs once
// more; any other failure propagates.
void write_into_output_folder(const std::string& output_dir, const std::string& what,
                              const std::function<void()>& write);

}  // namespace qlora::train::detail
