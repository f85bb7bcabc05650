// tokenizer.json / tokenizer_config.json values that know their file and key path, so that
// every error names both ("tokenizer.json: model.merges[3]: expected ...").
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>

#include "qlora/tokenizers/tokenizer.h"

namespace qlora::tokenizers::detail {

using nlohmann::json;

class JsonNode {
 public:
  JsonNode(const json& value, std::shared_ptr<const std::string> file, std::string path)
      : value_(&value), file_(std::move(file)), path_(std::move(path)) {}

  const json& value() const { return *value_; }

  [[noreturn]] void fail(const std::string& message) const {
    throw TokenizerError(*file_ + ": " + (path_.empty() ? "" : path_ + ": ") + message);
  }

  std::optional<JsonNode> find(const char* key) const {
    if (!value_->is_object()) fail("expected an object");
    const auto it = value_->find(key);
    if (it == value_->end() || it->is_null()) return std::nullopt;
    return child(*it, key);
  }

  JsonNode at(const char* key) const {
    std::optional<JsonNode> node = find(key);
    if (!node) throw TokenizerError(*file_ + ": " + child_path(key) + ": missing");
    return *node;
  }

  size_t size() const {
    if (!value_->is_array()) fail("expected an array");
    return value_->size();
  }

  JsonNode operator[](size_t i) const {
    size();  // checks the type
    return JsonNode((*value_)[i], file_, path_ + "[" + std::to_string(i) + "]");
  }

  std::string str() const {
    if (!value_->is_string()) fail("expected a string");
    return value_->get<std::string>();
  }

  bool boolean() const {
    if (!value_->is_boolean()) fail("expected true or false");
    return value_->get<bool>();
  }

  int64_t integer() const {
    if (!value_->is_number_integer()) fail("expected an integer");
    return value_->get<int64_t>();
  }

  int32_t id() const {
    const int64_t v = integer();
    if (v < 0 || v > INT32_MAX) fail("token id " + std::to_string(v) + " out of range");
    return static_cast<int32_t>(v);
  }

  std::string str_or(const char* key, const std::string& fallback) const {
    const auto node = find(key);
    return node ? node->str() : fallback;
  }
  bool bool_or(const char* key, bool fallback) const {
    const auto node = find(key);
    return node ? node->boolean() : fallback;
  }

  std::string type() const { return at("type").str(); }

 private:
  std::string child_path(const char* key) const { return path_.empty() ? key : path_ + "." + key; }
  JsonNode child(const json& value, const char* key) const {
    return JsonNode(value, file_, child_path(key));
  }

  const json* value_;
  std::shared_ptr<const std::string> file_;
  std::string path_;
};

// The file parsed as JSON; TokenizerError naming the path if it cannot be read or parsed.
json parse_json_file(const std::string& path);

}  // namespace qlora::tokenizers::detail
