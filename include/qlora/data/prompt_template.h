// Prompt templates: how a record becomes a prompt (never trained on) and a completion.
#pragma once

#include <string>
#include <vector>

#include "qlora/data/records.h"

namespace qlora::data {

// The prompt (context, never trained on) and the completion (trained on, EOS appended).
struct RenderedText {
  std::string prompt;
  std::string completion;
};

// SmolLM2-Instruct's chat template inserts this system message when a conversation has none.
inline constexpr const char* kSmolLM2SystemPrompt =
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face";

struct PromptTemplate {
  enum class Kind {
    // Stanford Alpaca's train.py text, exactly: the prompt ends in "### Response:" with no
    // newline and the output follows it directly.
    kAlpaca,
    // "<|im_start|>{role}\n{content}<|im_end|>\n" per message, then the generation prompt
    // "<|im_start|>assistant\n"; the completion is the reply followed by "<|im_end|>" (then EOS,
    // unless EOS is <|im_end|> itself, as in SmolLM2-Instruct). Instruction records become one
    // user turn: the instruction, and the input after a blank line when there is one.
    kChatML,
    // Prompt "{instruction}\n{input}\n" ("{instruction}\n" without input), completion "{output}".
    kPlain,
  };

  Kind kind = Kind::kAlpaca;
  // ChatML only: a system message put first when the conversation has none (SmolLM2-Instruct's
  // template does this with kSmolLM2SystemPrompt). Empty: none is added.
  std::string default_system;

  static PromptTemplate alpaca();
  static PromptTemplate chatml(std::string default_system = {});
  static PromptTemplate plain();
  // "alpaca" | "chatml" | "plain" | "smollm2" (chatml with kSmolLM2SystemPrompt); throws
  // std::invalid_argument listing these.
  static PromptTemplate from_name(const std::string& name);
  std::string name() const;

  // Completion records render as an empty prompt and their text under every template. Chat
  // records need kChatML: the others throw DataError naming the record's file:line.
  RenderedText render(const Record& record) const;
};

}  // namespace qlora::data
