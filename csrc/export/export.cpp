#include "qlora/export/export.h"

#include <stdexcept>

#include "qlora/export/gguf_model.h"
#include "qlora/export/hf_folder.h"
#include "qlora/models/qnat.h"
#include "qlora/nn/peft_adapter.h"

namespace qlora::exporters {
namespace {

struct FormatName {
  Format format;
  std::string_view name;
};
constexpr FormatName kFormats[] = {{Format::kPeft, "peft"},
                                   {Format::kHfFolder, "hf"},
                                   {Format::kGgufMerged, "gguf"},
                                   {Format::kGgufAdapter, "gguf-adapter"},
                                   {Format::kQnat, "qnat"}};

at::ScalarType hf_dtype(const std::string& outtype) {
  if (outtype == "f16") return at::kHalf;
  if (outtype == "bf16") return at::kBFloat16;
  if (outtype == "f32") return at::kFloat;
  throw std::invalid_argument(
      "export hf: outtype \"" + outtype +
      "\" is not f32, f16 or bf16 (q8_0, q4_0 and the K-quant mixes are GGUF types)");
}

}  // namespace

std::optional<Format> parse_format(std::string_view name) {
  for (const auto& f : kFormats)
    if (f.name == name) return f.format;
  return std::nullopt;
}

std::string_view format_name(Format format) {
  for (const auto& f : kFormats)
    if (f.format == format) return f.name;
  return "?";
}

std::vector<std::string> format_names() {
  std::vector<std::string> names;
  for (const auto& f : kFormats) names.emplace_back(f.name);
  return names;
}

void export_model(const Source& source, const Request& request) {
  auto& model = source.model;
  switch (request.format) {
    case Format::kPeft:
      nn::save_peft_adapter(request.out, *model, source.lora, {source.base_model});
      return;
    case Format::kHfFolder:
      save_hf_merged_folder(model, request.out, hf_dtype(request.outtype), source.tokenizer_source);
      return;
    case Format::kGgufMerged:
      models::export_gguf_merged(model, source.tokenizer_source, request.out, request.outtype);
      return;
    case Format::kGgufAdapter:
      models::export_gguf_adapter(model, request.out);
      return;
    case Format::kQnat: {
      models::QnatMetadata meta;
      meta.tokenizer_source = source.tokenizer_source;
      meta.lora = source.lora;
      models::save_qnat(request.out, *model, meta);
      return;
    }
  }
  throw std::invalid_argument("export: unknown format");
}

}  // namespace qlora::exporters
