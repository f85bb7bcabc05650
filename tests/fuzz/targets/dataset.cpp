// The dataset readers (Alpaca JSON / JSONL, chat JSONL, plain text) on any
// bytes, strict and lenient, then every record through the prompt templates.
// The first byte picks the reader.
#include "fuzz_support.h"
#include "qlora/data/prompt_template.h"
#include "qlora/data/records.h"

using namespace qlora;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const std::string_view content(reinterpret_cast<const char*>(data) + 1, size - 1);
  const std::string name = "fuzz/data.jsonl";
  for (const auto strictness : {data::Strictness::kReject, data::Strictness::kSkip}) {
    fuzz::expect_refusal_or_success(name, [&] {
      data::ReadResult r;
      switch (data[0] % 5) {
        case 0:
          r = data::parse_alpaca_json(content, name, strictness);
          break;
        case 1:
          r = data::parse_alpaca_jsonl(content, name, strictness);
          break;
        case 2:
          r = data::parse_chat_jsonl(content, name, strictness);
          break;
        case 3:
          r = data::parse_text(content, name, strictness, data::TextUnit::kLine);
          break;
        default:
          r = data::parse_text(content, name, strictness, data::TextUnit::kParagraph);
      }
      for (const char* t : {"alpaca", "chatml", "smollm2", "plain"}) {
        const auto tmpl = data::PromptTemplate::from_name(t);
        for (const auto& record : r.records) (void)tmpl.render(record);
      }
    });
  }
  return 0;
}
