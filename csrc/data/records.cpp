// Record-level plumbing: issue reporting, file reading and line splitting.
#include <stdexcept>
#include <system_error>

#include "data/data_internal.h"
#include "util/fs.h"

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

// The data readers' errors are DataErrors; the bytes come from the one file reader.
std::string read_file(const std::string& path) {
  try {
    return fs::read_file(path);
  } catch (const std::system_error& e) {
    throw DataError(e.what());
  }
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
