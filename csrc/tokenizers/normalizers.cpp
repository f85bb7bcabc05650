// The normalizers of a tokenizer.json (see normalizers.h).
#include "tokenizers/normalizers.h"

#include "tokenizers/regex.h"
#include "tokenizers/unicode.h"

namespace qlora::tokenizers::detail {

void parse_normalizer(const JsonNode& node, TextNormalizer& out) {
  const std::string type = node.type();
  if (type == "Sequence") {
    const JsonNode list = node.at("normalizers");
    for (size_t i = 0; i < list.size(); ++i) parse_normalizer(list[i], out);
  } else if (type == "NFC") {
    out.add(nfc);
  } else if (type == "NFD") {
    out.add(nfd);
  } else if (type == "Prepend") {
    out.add([prepend = node.at("prepend").str()](std::string_view s) {
      return s.empty() ? std::string() : prepend + std::string(s);
    });
  } else if (type == "Replace") {
    out.add([pattern = parse_pattern(node.at("pattern")), content = node.at("content").str()](
                std::string_view s) { return pattern.replace_all(s, content); });
  } else {
    node.at("type").fail("normalizer \"" + type +
                         "\" is not supported (NFC, NFD, Prepend, Replace, Sequence)");
  }
}

}  // namespace qlora::tokenizers::detail
