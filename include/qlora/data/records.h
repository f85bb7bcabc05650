// Instruction-tuning records (Alpaca instruction/input/output, chat messages, raw text) and
// their readers: JSON, JSONL and plain text, strict or skipping malformed records.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace qlora::data {

// What a reader does with a malformed record (bad JSON, missing, empty or mistyped fields,
// unknown roles) or an empty file: kSkip reports it in ReadResult::issues and goes on;
// kReject throws DataError at the first one. Either way the message is "file:line: what".
enum class Strictness { kSkip, kReject };

struct DataIssue {
  std::string file;
  int64_t line = 0;  // 1-based line where the offending record starts
  std::string message;

  std::string to_string() const;  // "file:line: message"
};

// Malformed data under Strictness::kReject, or a file that cannot be read. The message names
// the file and line.
class DataError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

enum class Role { kSystem, kUser, kAssistant };
const char* role_name(Role role);  // "system" | "user" | "assistant"

struct Message {
  Role role = Role::kUser;
  std::string content;
};

enum class RecordKind {
  kInstruction,  // Alpaca: instruction, optional input, output
  kChat,         // messages; the last one is the assistant's reply that is trained on
  kCompletion,   // raw text, trained on in full
};

struct Record {
  RecordKind kind = RecordKind::kInstruction;
  std::string instruction;        // kInstruction
  std::string input;              // kInstruction; empty when the record has none
  std::string output;             // kInstruction
  std::vector<Message> messages;  // kChat
  std::string text;               // kCompletion
  std::string file;               // where the record was read from, for messages
  int64_t line = 0;
};

struct ReadResult {
  std::vector<Record> records;
  std::vector<DataIssue> issues;  // only under Strictness::kSkip
};

enum class DataFormat {
  kAuto,         // by extension: .json -> kAlpacaJson, .txt -> kText, .jsonl -> kChatJsonl if
                 // the first record has "messages", else kAlpacaJsonl
  kAlpacaJson,   // one JSON array of {"instruction", "input"?, "output"} objects
  kAlpacaJsonl,  // one such object per line
  kChatJsonl,    // one {"messages": [{"role", "content"}, ...]} object per line
  kText,         // plain text, see TextUnit
};
// "auto", "alpaca_json", "alpaca_jsonl", "chat_jsonl", "text"; throws std::invalid_argument.
DataFormat parse_data_format(const std::string& name);

// How a plain-text file is cut into documents. kParagraph (the default): a document is a run
// of non-blank lines, its lines joined with '\n'; blank (whitespace-only) lines separate
// documents. kLine: every non-blank line is a document.
enum class TextUnit { kParagraph, kLine };

// Record rules: a record must be a JSON object; required string fields must be non-blank
// (not only whitespace); "input" may be absent, null or a string; fields we do not know are
// ignored. Chat: "messages" is a non-empty array of {"role": system|user|assistant, "content":
// non-blank string} whose last message is the assistant's. Blank JSONL lines are skipped. A
// file with no record at all is reported as an issue at line 1. A file that cannot be opened
// throws DataError under both strictness modes: that is a wrong path, not bad data.
ReadResult read_alpaca_json(const std::string& path, Strictness strictness);
ReadResult read_alpaca_jsonl(const std::string& path, Strictness strictness);
ReadResult read_chat_jsonl(const std::string& path, Strictness strictness);
ReadResult read_text(const std::string& path, Strictness strictness,
                     TextUnit unit = TextUnit::kParagraph);
ReadResult read_records(const std::string& path, DataFormat format, Strictness strictness,
                        TextUnit unit = TextUnit::kParagraph);

// The same parsers on text already in memory; `name` stands for the file in messages.
ReadResult parse_alpaca_json(std::string_view content, const std::string& name,
                             Strictness strictness);
ReadResult parse_alpaca_jsonl(std::string_view content, const std::string& name,
                              Strictness strictness);
ReadResult parse_chat_jsonl(std::string_view content, const std::string& name,
                            Strictness strictness);
ReadResult parse_text(std::string_view content, const std::string& name, Strictness strictness,
                      TextUnit unit = TextUnit::kParagraph);

}  // namespace qlora::data
