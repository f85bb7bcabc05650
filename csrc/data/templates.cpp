// Prompt templates: how a record becomes prompt text and completion text.
#include <stdexcept>

#include "data/data_internal.h"

namespace qlora::data {
namespace {

// Stanford Alpaca's PROMPT_DICT (train.py), byte for byte.
constexpr const char* kAlpacaWithInput =
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n";
constexpr const char* kAlpacaNoInput =
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n"
    "### Instruction:\n";

constexpr const char* kImStart = "<|im_start|>";
constexpr const char* kImEnd = "<|im_end|>";

std::string chatml_turn(const char* role, const std::string& content) {
  return std::string(kImStart) + role + "\n" + content + kImEnd + "\n";
}

RenderedText render_alpaca(const Record& r) {
  if (r.input.empty()) {
    return {kAlpacaNoInput + r.instruction + "\n\n### Response:", r.output};
  }
  return {kAlpacaWithInput + r.instruction + "\n\n### Input:\n" + r.input + "\n\n### Response:",
          r.output};
}

RenderedText render_plain(const Record& r) {
  std::string prompt = r.instruction + "\n";
  if (!r.input.empty()) prompt += r.input + "\n";
  return {prompt, r.output};
}

// Only the last assistant message is trained on; earlier turns are context, as in a
// single-reply completion request.
RenderedText render_chatml(const Record& r, const std::string& default_system) {
  std::string prompt;
  const bool has_system = r.kind == RecordKind::kChat && !r.messages.empty() &&
                          r.messages.front().role == Role::kSystem;
  if (!default_system.empty() && !has_system) prompt += chatml_turn("system", default_system);
  std::string reply;
  if (r.kind == RecordKind::kInstruction) {
    prompt +=
        chatml_turn("user", r.input.empty() ? r.instruction : r.instruction + "\n\n" + r.input);
    reply = r.output;
  } else {
    for (size_t i = 0; i + 1 < r.messages.size(); ++i) {
      prompt += chatml_turn(role_name(r.messages[i].role), r.messages[i].content);
    }
    reply = r.messages.back().content;
  }
  prompt += std::string(kImStart) + "assistant\n";
  return {prompt, reply + kImEnd};
}

}  // namespace

PromptTemplate PromptTemplate::alpaca() { return {Kind::kAlpaca, {}}; }
PromptTemplate PromptTemplate::chatml(std::string default_system) {
  return {Kind::kChatML, std::move(default_system)};
}
PromptTemplate PromptTemplate::plain() { return {Kind::kPlain, {}}; }

PromptTemplate PromptTemplate::from_name(const std::string& name) {
  if (name == "alpaca") return alpaca();
  if (name == "chatml") return chatml();
  if (name == "smollm2") return chatml(kSmolLM2SystemPrompt);
  if (name == "plain") return plain();
  throw std::invalid_argument("unknown prompt template \"" + name +
                              "\" (expected alpaca, chatml, smollm2 or plain)");
}

std::string PromptTemplate::name() const {
  switch (kind) {
    case Kind::kAlpaca:
      return "alpaca";
    case Kind::kChatML:
      return default_system == kSmolLM2SystemPrompt ? "smollm2" : "chatml";
    case Kind::kPlain:
      return "plain";
  }
  return "?";
}

RenderedText PromptTemplate::render(const Record& record) const {
  // Raw text has no prompt to template: it is all completion.
  if (record.kind == RecordKind::kCompletion) return {"", record.text};
  if (kind == Kind::kChatML) return render_chatml(record, default_system);
  if (record.kind == RecordKind::kChat) {
    throw DataError(record.file + ":" + std::to_string(record.line) + ": the " + name() +
                    " template cannot render chat records; use chatml");
  }
  return kind == Kind::kAlpaca ? render_alpaca(record) : render_plain(record);
}

}  // namespace qlora::data
