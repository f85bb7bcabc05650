// The post-processor of a tokenizer.json (see post_processors.h).
#include "tokenizers/post_processors.h"

namespace qlora::tokenizers::detail {

namespace {

std::vector<int32_t> special_token_ids(const JsonNode& special_tokens, const std::string& name) {
  const JsonNode ids = special_tokens.at(name.c_str()).at("ids");
  std::vector<int32_t> out;
  for (size_t i = 0; i < ids.size(); ++i) out.push_back(ids[i].id());
  return out;
}

// TemplateProcessing's "single" template: special tokens around $A.
Template parse_template(const JsonNode& node) {
  const JsonNode single = node.at("single");
  const auto special_tokens = node.find("special_tokens");
  Template t;
  bool seen_sequence = false;
  for (size_t i = 0; i < single.size(); ++i) {
    const JsonNode item = single[i];
    if (const auto sequence = item.find("Sequence")) {
      if (sequence->at("id").str() != "A" || seen_sequence) {
        sequence->fail("a single-sequence template holds $A once");
      }
      seen_sequence = true;
    } else if (const auto special = item.find("SpecialToken")) {
      if (!special_tokens) node.at("special_tokens").fail("missing");
      const std::vector<int32_t> ids = special_token_ids(*special_tokens, special->at("id").str());
      std::vector<int32_t>& side = seen_sequence ? t.suffix : t.prefix;
      side.insert(side.end(), ids.begin(), ids.end());
    } else {
      item.fail("expected {\"SpecialToken\": ...} or {\"Sequence\": ...}");
    }
  }
  if (!seen_sequence) single.fail("the template has no $A");
  return t;
}

// RobertaProcessing / BertProcessing: "cls": [token, id], "sep": [token, id].
Template parse_cls_sep(const JsonNode& node) {
  Template t;
  t.prefix.push_back(node.at("cls")[1].id());
  t.suffix.push_back(node.at("sep")[1].id());
  return t;
}

}  // namespace

void parse_post_processor(const JsonNode& node, Template& out) {
  const std::string type = node.type();
  if (type == "Sequence") {
    const JsonNode list = node.at("processors");
    for (size_t i = 0; i < list.size(); ++i) parse_post_processor(list[i], out);
  } else if (type == "TemplateProcessing") {
    out.wrap(parse_template(node));
  } else if (type == "RobertaProcessing" || type == "BertProcessing") {
    out.wrap(parse_cls_sep(node));
  } else if (type != "ByteLevel") {  // ByteLevel only trims offsets
    node.at("type").fail("post-processor \"" + type +
                         "\" is not supported (TemplateProcessing, ByteLevel, RobertaProcessing, "
                         "BertProcessing, Sequence)");
  }
}

}  // namespace qlora::tokenizers::detail
