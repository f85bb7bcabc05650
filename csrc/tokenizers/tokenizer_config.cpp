// Reading tokenizer_config.json (see tokenizer_config.h).
#include "tokenizers/tokenizer_config.h"

#include <fstream>
#include <memory>

#include "tokenizers/json_node.h"

namespace qlora::tokenizers::detail {

namespace {

std::string directory_of(const std::string& path) {
  const size_t slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

std::optional<std::string> config_token(const JsonNode& root, const char* key) {
  const auto node = root.find(key);
  if (!node) return std::nullopt;
  if (node->value().is_string()) return node->str();
  return node->at("content").str();  // {"content": ..., "__type": "AddedToken"}
}

}  // namespace

std::optional<TokenizerConfig> read_tokenizer_config(const std::string& tokenizer_file) {
  const std::string path = directory_of(tokenizer_file) + "/tokenizer_config.json";
  std::ifstream probe(path);
  if (!probe) return std::nullopt;
  const json doc = parse_json_file(path);
  const JsonNode root(doc, std::make_shared<const std::string>(path), "");
  if (!doc.is_object()) root.fail("expected a JSON object");
  TokenizerConfig config;
  config.bos = config_token(root, "bos_token");
  config.eos = config_token(root, "eos_token");
  config.pad = config_token(root, "pad_token");
  config.unk = config_token(root, "unk_token");
  if (const auto b = root.find("add_bos_token")) config.add_bos = b->boolean();
  if (const auto e = root.find("add_eos_token")) config.add_eos = e->boolean();
  if (const auto t = root.find("chat_template"); t && t->value().is_string()) {
    config.chat_template = t->str();
  }
  return config;
}

}  // namespace qlora::tokenizers::detail
