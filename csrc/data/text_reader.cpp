// Plain-text completion files, and read_records, which picks the reader for a file.
#include "data/json_records.h"
#include "util/strings.h"

namespace qlora::data {
namespace {

Record completion_record(std::string text, const std::string& name, int64_t line) {
  Record record;
  record.kind = RecordKind::kCompletion;
  record.text = std::move(text);
  record.file = name;
  record.line = line;
  return record;
}

using util::ends_with;

// .jsonl files hold either format; the first record decides. Anything unreadable there falls
// back to Alpaca, whose reader then reports the problem.
DataFormat sniff_jsonl(const std::string& path) {
  const std::string content = detail::read_file(path);
  for (const detail::Line& line : detail::split_lines(detail::strip_bom(content))) {
    if (detail::is_blank(line.text)) continue;
    const nlohmann::json value = nlohmann::json::parse(line.text, nullptr, false);
    const bool chat = value.is_object() && value.contains("messages");
    return chat ? DataFormat::kChatJsonl : DataFormat::kAlpacaJsonl;
  }
  return DataFormat::kAlpacaJsonl;
}

DataFormat detect_format(const std::string& path) {
  if (ends_with(path, ".json")) return DataFormat::kAlpacaJson;
  if (ends_with(path, ".jsonl")) return sniff_jsonl(path);
  if (ends_with(path, ".txt")) return DataFormat::kText;
  throw std::invalid_argument("cannot tell the data format of '" + path +
                              "' from its extension (.json, .jsonl, .txt); name it explicitly");
}

}  // namespace

ReadResult parse_text(std::string_view content, const std::string& name, Strictness strictness,
                      TextUnit unit) {
  ReadResult result;
  detail::IssueSink sink(name, strictness, &result.issues);
  std::string document;
  int64_t first_line = 0;
  auto flush = [&] {
    if (!document.empty()) result.records.push_back(completion_record(document, name, first_line));
    document.clear();
  };
  for (const detail::Line& line : detail::split_lines(detail::strip_bom(content))) {
    if (detail::is_blank(line.text)) {
      flush();
      continue;
    }
    if (document.empty())
      first_line = line.number;
    else
      document += '\n';
    document.append(line.text);
    if (unit == TextUnit::kLine) flush();
  }
  flush();
  if (result.records.empty()) sink.report(1, "empty file: no text");
  return result;
}

ReadResult read_text(const std::string& path, Strictness strictness, TextUnit unit) {
  return parse_text(detail::read_file(path), path, strictness, unit);
}

ReadResult read_records(const std::string& path, DataFormat format, Strictness strictness,
                        TextUnit unit) {
  if (format == DataFormat::kAuto) format = detect_format(path);
  switch (format) {
    case DataFormat::kAlpacaJson:
      return read_alpaca_json(path, strictness);
    case DataFormat::kAlpacaJsonl:
      return read_alpaca_jsonl(path, strictness);
    case DataFormat::kChatJsonl:
      return read_chat_jsonl(path, strictness);
    case DataFormat::kText:
      return read_text(path, strictness, unit);
    case DataFormat::kAuto:
      break;
  }
  throw std::invalid_argument("read_records: invalid DataFormat");
}

}  // namespace qlora::data
