#include "util/fs.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <system_error>

namespace qlora::fs {

namespace {
[[noreturn]] void fail(const std::string& what, const std::string& path) {
  throw std::runtime_error(what + " \"" + path + "\": " + std::strerror(errno));
}
}  // namespace

bool exists(const std::string& path) {
  struct stat st {};
  return stat(path.c_str(), &st) == 0;
}

bool is_dir(const std::string& path) {
  struct stat st {};
  return stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

bool is_file(const std::string& path) {
  struct stat st {};
  return stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

std::string parent(const std::string& path) {
  const auto slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

void make_dirs(const std::string& path) {
  if (path.empty() || is_dir(path)) return;
  make_dirs(parent(path));
  if (mkdir(path.c_str(), 0755) != 0 && errno != EEXIST) fail("cannot create folder", path);
}

void make_dir(const std::string& path) {
  if (mkdir(path.c_str(), 0755) != 0 && !(errno == EEXIST && is_dir(path)))
    fail("cannot create folder", path);
}

void remove_tree(const std::string& path) {
  struct stat st {};
  if (lstat(path.c_str(), &st) != 0) return;
  if (S_ISDIR(st.st_mode)) {
    for (const auto& name : list_dir(path)) remove_tree(path + "/" + name);
    if (rmdir(path.c_str()) != 0) fail("cannot remove folder", path);
  } else if (unlink(path.c_str()) != 0) {
    fail("cannot remove", path);
  }
}

std::vector<std::string> list_dir(const std::string& path) {
  DIR* dir = opendir(path.c_str());
  if (!dir) fail("cannot list folder", path);
  std::vector<std::string> names;
  while (dirent* e = readdir(dir)) {
    const std::string name = e->d_name;
    if (name != "." && name != "..") names.push_back(name);
  }
  closedir(dir);
  std::sort(names.begin(), names.end());
  return names;
}

void rename_durably(const std::string& from, const std::string& to) {
  if (::rename(from.c_str(), to.c_str()) != 0) {
    throw std::system_error(errno, std::generic_category(),
                            "cannot rename \"" + from + "\" to \"" + to + "\"");
  }
  const std::string dir = parent(to);
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) {
    throw std::system_error(errno, std::generic_category(),
                            "cannot open the folder \"" + dir + "\" to make a rename durable");
  }
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  // Some file systems cannot fsync a folder and say so with EINVAL; the
  // rename is then as durable as that file system can make it.
  if (rc != 0 && err != EINVAL) {
    throw std::system_error(err, std::generic_category(),
                            "cannot fsync the folder of \"" + to + "\"");
  }
}

std::string read_file(const std::string& path) {
  const auto io_error = [&](const char* what, int err) {
    return std::system_error(err, std::generic_category(),
                             std::string("cannot ") + what + " '" + path + "'");
  };
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw io_error("open", errno);
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  struct stat st {};
  if (::fstat(fd, &st) != 0) throw io_error("stat", errno);
  // read() on a folder fails with EISDIR anyway; saying so up front is clearer.
  if (S_ISDIR(st.st_mode)) throw io_error("read", EISDIR);
  std::string content;
  if (S_ISREG(st.st_mode)) content.reserve(static_cast<size_t>(st.st_size));
  char buffer[1 << 16];
  for (;;) {
    const ssize_t n = ::read(fd, buffer, sizeof(buffer));
    if (n < 0) {
      if (errno == EINTR) continue;
      throw io_error("read", errno);
    }
    if (n == 0) break;
    content.append(buffer, static_cast<size_t>(n));
  }
  return content;
}

}  // namespace qlora::fs
