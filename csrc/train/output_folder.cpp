#include "train/output_folder.h"

#include <exception>

#include "util/fs.h"
#include "util/log.h"

namespace qlora::train::detail {
namespace {

void recreate(const std::string& output_dir, const std::string& what) {
  fs::make_dirs(output_dir);
  log::reopen_files();  // train.log lives there
  log::warn("the output folder " + output_dir +
            " has disappeared since training started; created it again for " + what);
}

}  // namespace

void write_into_output_folder(const std::string& output_dir, const std::string& what,
                              const std::function<void()>& write) {
  if (!fs::is_dir(output_dir)) recreate(output_dir, what);
  try {
    write();
  } catch (const std::exception&) {
    if (fs::is_dir(output_dir)) throw;  // a real failure: disk full, permissions...
    recreate(output_dir, what);
    write();
  }
}

}  // namespace qlora::train::detail
