// Alpaca JSON / JSONL and chat JSONL readers: field checks and the per-format loops.
#include <functional>

#include "data/json_records.h"

namespace qlora::data {
namespace detail {
namespace {

using nlohmann::json;

std::string in_quotes(const std::string& s) { return "\"" + s + "\""; }

// Reads a string field. `required`: missing is an error; otherwise missing and null give "".
bool string_field(const json& object, const char* key, bool required, bool allow_blank,
                  const std::string& context, int64_t line, IssueSink& sink, std::string* out) {
  const auto it = object.find(key);
  if (it == object.end() || (!required && it->is_null())) {
    if (!required) return true;
    sink.report(line, context + "missing field " + in_quotes(key));
    return false;
  }
  if (!it->is_string()) {
    sink.report(line,
                context + "field " + in_quotes(key) + " must be a string, got " + it->type_name());
    return false;
  }
  *out = it->get<std::string>();
  if (!allow_blank && is_blank(*out)) {
    sink.report(line, context + "field " + in_quotes(key) + " is empty");
    return false;
  }
  return true;
}

bool parse_role(const std::string& name, Role* role) {
  for (const Role r : {Role::kSystem, Role::kUser, Role::kAssistant}) {
    if (name == role_name(r)) {
      *role = r;
      return true;
    }
  }
  return false;
}

bool message_from_json(const json& value, size_t index, int64_t line, IssueSink& sink,
                       Message* out) {
  const std::string context = "message " + std::to_string(index + 1) + ": ";
  if (!value.is_object()) {
    sink.report(line, context + "must be a JSON object, got " + value.type_name());
    return false;
  }
  std::string role;
  if (!string_field(value, "role", true, false, context, line, sink, &role)) return false;
  if (!parse_role(role, &out->role)) {
    sink.report(line, context + "unknown role " + in_quotes(role) +
                          " (expected system, user or assistant)");
    return false;
  }
  return string_field(value, "content", true, false, context, line, sink, &out->content);
}

using RecordCallback = std::function<void(const json& value, int64_t line)>;

// Calls `make` for every element of a top-level JSON array.
void for_each_array_record(std::string_view content, IssueSink& sink, const RecordCallback& make) {
  for (const JsonElement& element : scan_json_array(content)) {
    if (!element.error.empty()) {
      sink.report(element.line, element.error);
      continue;
    }
    json value;
    if (parse_json_value(element.text, element.line, sink, &value)) make(value, element.line);
  }
}

// Calls `make` for every non-blank line.
void for_each_line_record(std::string_view content, IssueSink& sink, const RecordCallback& make) {
  for (const Line& line : split_lines(content)) {
    if (is_blank(line.text)) continue;
    json value;
    if (parse_json_value(line.text, line.number, sink, &value)) make(value, line.number);
  }
}

using ForEachRecord = void (*)(std::string_view, IssueSink&, const RecordCallback&);
using ConvertRecord = bool (*)(const json&, int64_t, IssueSink&, Record*);

// Shared body of every JSON reader: the empty-file check and the record conversion.
ReadResult read_json_records(std::string_view content, const std::string& name,
                             Strictness strictness, ForEachRecord for_each, ConvertRecord convert) {
  ReadResult result;
  IssueSink sink(name, strictness, &result.issues);
  content = strip_bom(content);
  if (is_blank(content)) {
    sink.report(1, "empty file: no records");
    return result;
  }
  bool any = false;
  for_each(content, sink, [&](const json& value, int64_t line) {
    any = true;
    Record record;
    if (convert(value, line, sink, &record)) {
      record.file = name;
      record.line = line;
      result.records.push_back(std::move(record));
    }
  });
  if (!any && result.issues.empty()) sink.report(1, "no records");
  return result;
}

}  // namespace

bool alpaca_record_from_json(const json& value, int64_t line, IssueSink& sink, Record* out) {
  if (!value.is_object()) {
    sink.report(line, std::string("record must be a JSON object, got ") + value.type_name());
    return false;
  }
  out->kind = RecordKind::kInstruction;
  return string_field(value, "instruction", true, false, "", line, sink, &out->instruction) &&
         string_field(value, "input", false, true, "", line, sink, &out->input) &&
         string_field(value, "output", true, false, "", line, sink, &out->output);
}

bool chat_record_from_json(const json& value, int64_t line, IssueSink& sink, Record* out) {
  if (!value.is_object()) {
    sink.report(line, std::string("record must be a JSON object, got ") + value.type_name());
    return false;
  }
  const auto it = value.find("messages");
  if (it == value.end()) {
    sink.report(line, "missing field \"messages\"");
    return false;
  }
  if (!it->is_array() || it->empty()) {
    sink.report(line, it->is_array() ? std::string("field \"messages\" is an empty array")
                                     : std::string("field \"messages\" must be an array, got ") +
                                           it->type_name());
    return false;
  }
  out->kind = RecordKind::kChat;
  out->messages.resize(it->size());
  for (size_t i = 0; i < it->size(); ++i) {
    if (!message_from_json((*it)[i], i, line, sink, &out->messages[i])) return false;
  }
  if (out->messages.back().role != Role::kAssistant) {
    sink.report(line, std::string("the last message must be the assistant's (the reply to "
                                  "train on), got ") +
                          role_name(out->messages.back().role));
    return false;
  }
  return true;
}

}  // namespace detail

ReadResult parse_alpaca_json(std::string_view content, const std::string& name,
                             Strictness strictness) {
  return detail::read_json_records(content, name, strictness, detail::for_each_array_record,
                                   detail::alpaca_record_from_json);
}

ReadResult parse_alpaca_jsonl(std::string_view content, const std::string& name,
                              Strictness strictness) {
  return detail::read_json_records(content, name, strictness, detail::for_each_line_record,
                                   detail::alpaca_record_from_json);
}

ReadResult parse_chat_jsonl(std::string_view content, const std::string& name,
                            Strictness strictness) {
  return detail::read_json_records(content, name, strictness, detail::for_each_line_record,
                                   detail::chat_record_from_json);
}

ReadResult read_alpaca_json(const std::string& path, Strictness strictness) {
  return parse_alpaca_json(detail::read_file(path), path, strictness);
}

ReadResult read_alpaca_jsonl(const std::string& path, Strictness strictness) {
  return parse_alpaca_jsonl(detail::read_file(path), path, strictness);
}

ReadResult read_chat_jsonl(const std::string& path, Strictness strictness) {
  return parse_chat_jsonl(detail::read_file(path), path, strictness);
}

}  // namespace qlora::data
