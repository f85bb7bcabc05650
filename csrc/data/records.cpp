// Record-level plumbing: issue reporting, file reading and line splitting.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>

#include "data/data_internal.h"

namespace qlora::data {

std::string DataIssue::to_string() const {
  return file + ":" + std::to_string(line) + ": " + message;
}

const char* role_name(Role role) {
  switch (role) {
    case Role::kSystem:
      return "system";
    case Role::kUser:
      return "user";
    case Role::kAssistant:
      return "assistant";
  }
  return "?";
}

DataFormat parse_data_format(const std::string& name) {
  if (name == "auto") return DataFormat::kAuto;
  if (name == "alpaca_json") return DataFormat::kAlpacaJson;
  if (name == "alpaca_jsonl") return DataFormat::kAlpacaJsonl;
  if (name == "chat_jsonl") return DataFormat::kChatJsonl;
  if (name == "text") return DataFormat::kText;
  throw std::invalid_argument("unknown data format \"" + name +
                              "\" (expected auto, alpaca_json, alpaca_jsonl, chat_jsonl or text)");
}

namespace detail {

void IssueSink::report(int64_t line, std::string message) {
  DataIssue issue{file_, line, std::move(message)};
  if (strictness_ == Strictness::kReject) throw DataError(issue.to_string());
  if (out_ != nullptr) out_->push_back(std::move(issue));
}

std::vector<Line> split_lines(std::string_view content) {
  std::vector<Line> lines;
  int64_t number = 1;
  size_t start = 0;
  while (start < content.size()) {
    size_t end = content.find('\n', start);
    if (end == std::string_view::npos) end = content.size();
    std::string_view text = content.substr(start, end - start);
    if (!text.empty() && text.back() == '\r') text.remove_suffix(1);
    lines.push_back({text, number++});
    start = end + 1;
  }
  return lines;
}

namespace {

[[noreturn]] void throw_io(const std::string& what, const std::string& path, int err) {
  throw DataError("cannot " + what + " '" + path + "': " + std::strerror(err));
}

// Closes the descriptor on every path out of read_file.
struct Fd {
  int fd;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

}  // namespace

std::string read_file(const std::string& path) {
  Fd file{::open(path.c_str(), O_RDONLY | O_CLOEXEC)};
  if (file.fd < 0) throw_io("open", path, errno);
  struct stat st;
  if (::fstat(file.fd, &st) != 0) throw_io("stat", path, errno);
  // read() on a directory fails with EISDIR anyway; saying so up front is clearer.
  if (S_ISDIR(st.st_mode)) throw_io("read", path, EISDIR);
  std::string content;
  if (S_ISREG(st.st_mode)) content.reserve(static_cast<size_t>(st.st_size));
  char buffer[1 << 16];
  for (;;) {
    const ssize_t n = ::read(file.fd, buffer, sizeof(buffer));
    if (n < 0) {
      if (errno == EINTR) continue;
      throw_io("read", path, errno);
    }
    if (n == 0) break;
    content.append(buffer, static_cast<size_t>(n));
  }
  return content;
}

std::string_view strip_bom(std::string_view content) {
  constexpr std::string_view kBom = "\xEF\xBB\xBF";
  if (content.substr(0, kBom.size()) == kBom) content.remove_prefix(kBom.size());
  return content;
}

bool is_blank(std::string_view text) {
  for (const char c : text) {
    if (c != ' ' && c != '\t' && c != '\r' && c != '\n' && c != '\f' && c != '\v') return false;
  }
  return true;
}

}  // namespace detail
}  // namespace qlora::data
