// tokenizer.json: every stage read from its JSON (the BPE model, added tokens, special ids here;
// each other stage's parser beside its code), and the file's vocabulary for the GGUF export.
#include "tokenizers/tokenizer_json.h"

#include <algorithm>
#include <functional>
#include <memory>
#include <unordered_map>
#include <utility>

#include "qlora/tokenizers/tokenizer.h"
#include "tokenizers/hf_tokenizer.h"
#include "tokenizers/json_node.h"
#include "tokenizers/tokenizer_config.h"
#include "util/strings.h"

namespace qlora::tokenizers {
namespace {

using namespace detail;
using util::starts_with;

// tokenizer.json

BpeModel::MergeList parse_merges(const JsonNode& merges, std::vector<size_t>* json_index) {
  BpeModel::MergeList out;
  for (size_t i = 0; i < merges.size(); ++i) {
    const JsonNode m = merges[i];
    if (m.value().is_string()) {
      const std::string line = m.str();
      if (starts_with(line, "#version")) continue;
      const size_t space = line.find(' ');
      if (space == std::string::npos || line.find(' ', space + 1) != std::string::npos) {
        m.fail("expected \"left right\" (two tokens separated by one space)");
      }
      out.emplace_back(line.substr(0, space), line.substr(space + 1));
    } else if (m.value().is_array() && m.size() == 2) {
      out.emplace_back(m[0].str(), m[1].str());
    } else {
      m.fail("expected \"left right\" or [\"left\", \"right\"]");
    }
    json_index->push_back(i);
  }
  return out;
}

// Calls add(token, id) for each entry of "vocab" ({token: id}), in the order of the JSON object.
void parse_vocab(const JsonNode& vocab_node,
                 const std::function<void(const std::string&, int32_t)>& add) {
  if (!vocab_node.value().is_object()) vocab_node.fail("expected an object {token: id}");
  for (const auto& [token, id] : vocab_node.value().items()) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > INT32_MAX) {
      vocab_node.fail("\"" + token + "\": expected a non-negative integer id");
    }
    add(token, id.get<int32_t>());
  }
}

std::optional<std::string> optional_string(const JsonNode& node, const char* key) {
  const auto v = node.find(key);
  if (!v) return std::nullopt;
  return v->str();
}

BpeModel parse_bpe_model(const JsonNode& node) {
  const std::string type = node.str_or("type", "BPE");
  if (type != "BPE") node.at("type").fail("model \"" + type + "\" is not supported (BPE)");
  BpeModel::Vocab vocab;
  parse_vocab(node.at("vocab"),
              [&vocab](const std::string& token, int32_t id) { vocab[token] = id; });
  BpeOptions options;
  options.unk_token = optional_string(node, "unk_token");
  options.continuing_subword_prefix =
      optional_string(node, "continuing_subword_prefix").value_or("");
  options.end_of_word_suffix = optional_string(node, "end_of_word_suffix").value_or("");
  options.fuse_unk = node.bool_or("fuse_unk", false);
  options.byte_fallback = node.bool_or("byte_fallback", false);
  options.ignore_merges = node.bool_or("ignore_merges", false);
  // "dropout" only randomizes training-time segmentation; encoding here is deterministic.

  std::vector<size_t> json_index;
  BpeModel::MergeList merges;
  std::optional<JsonNode> merges_node = node.find("merges");
  if (merges_node) merges = parse_merges(*merges_node, &json_index);
  const auto error = [&](size_t rank, const std::string& message) {
    (*merges_node)[json_index[rank]].fail(message);
  };
  return BpeModel(std::move(vocab), merges, std::move(options), error);
}

// An entry of "added_tokens", with the id the file gives it.
AddedToken parse_added_token(const JsonNode& node) {
  AddedToken t;
  t.content = node.at("content").str();
  t.special = node.bool_or("special", false);
  t.single_word = node.bool_or("single_word", false);
  t.lstrip = node.bool_or("lstrip", false);
  t.rstrip = node.bool_or("rstrip", false);
  t.normalized = node.bool_or("normalized", !t.special);
  t.id = node.at("id").id();  // required, though tokenizers derives the id itself
  return t;
}

// The id tokenizers gives an added token, whatever the file's "id" says (it only warns when
// they differ): the id the content already has, else the next id after the vocabulary.
class AddedIdAssigner {
 public:
  explicit AddedIdAssigner(const BpeModel& model) : model_(model) {}

  int32_t assign(const std::string& content) {
    if (const auto it = assigned_.find(content); it != assigned_.end()) return it->second;
    std::optional<int32_t> id = model_.token_to_id(content);
    if (!id) {
      const auto size = static_cast<int64_t>(model_.vocab_entries());
      id = static_cast<int32_t>(max_id_ < 0                      ? size
                                : (max_id_ >= size || size == 0) ? max_id_ + 1
                                                                 : size);
    }
    assigned_[content] = *id;
    max_id_ = std::max<int64_t>(max_id_, *id);
    return *id;
  }

 private:
  const BpeModel& model_;
  std::unordered_map<std::string, int32_t> assigned_;
  int64_t max_id_ = -1;
};

std::vector<AddedToken> parse_added_tokens(const JsonNode& list, const BpeModel& model) {
  std::vector<AddedToken> out;
  AddedIdAssigner ids(model);
  for (size_t i = 0; i < list.size(); ++i) {
    AddedToken t = parse_added_token(list[i]);
    t.id = ids.assign(t.content);
    out.push_back(std::move(t));
  }
  return out;
}

// Special ids from tokenizer_config.json, else from the template and the model. Its
// add_bos_token / add_eos_token are ignored, as transformers 5 ignores them whenever a
// tokenizer.json exists: the file's post-processor decides.
void apply_config(const JsonNode& root, const std::optional<TokenizerConfig>& config,
                  HfParts& parts) {
  auto id_of = [&parts](const std::optional<std::string>& token) -> std::optional<int32_t> {
    if (!token) return std::nullopt;
    // Added tokens first, the last of a repeated content winning, as in the tokenizer.
    for (auto it = parts.added_tokens.rbegin(); it != parts.added_tokens.rend(); ++it) {
      if (it->content == *token) return it->id;
    }
    return parts.model.token_to_id(*token);
  };
  SpecialIds& s = parts.special;
  if (config) {
    s.bos = id_of(config->bos);
    s.eos = id_of(config->eos);
    s.pad = id_of(config->pad);
    s.unk = id_of(config->unk);
  }
  if (!s.bos && !parts.post.prefix.empty()) s.bos = parts.post.prefix.front();
  if (!s.eos && !parts.post.suffix.empty()) s.eos = parts.post.suffix.back();
  if (!s.unk) s.unk = parts.model.unk_id();
  if (!s.pad) {
    if (const auto padding = root.find("padding")) {
      if (const auto pad_id = padding->find("pad_id")) s.pad = pad_id->id();
    }
  }
}

}  // namespace

std::unique_ptr<Tokenizer> load_tokenizer_json(const std::string& path) {
  const json doc = parse_json_file(path);
  const JsonNode root(doc, std::make_shared<const std::string>(path), "");
  if (!doc.is_object()) root.fail("expected a JSON object");
  HfParts parts;
  if (const auto n = root.find("normalizer")) parse_normalizer(*n, parts.normalizer);
  if (const auto p = root.find("pre_tokenizer")) parse_pre_tokenizer(*p, parts.pre_tokenizer);
  parts.model = parse_bpe_model(root.at("model"));
  if (const auto a = root.find("added_tokens"))
    parts.added_tokens = parse_added_tokens(*a, parts.model);
  if (const auto p = root.find("post_processor")) parse_post_processor(*p, parts.post);
  if (const auto d = root.find("decoder")) parse_decoder(*d, parts.decoder);
  apply_config(root, read_tokenizer_config(path), parts);
  return make_hf_tokenizer(std::move(parts));
}

namespace {

// The split regexes of the Llama 3 and Qwen2 tokenizer.json files (they differ in how many
// digits a number token takes), as those files write them.
constexpr const char* kLlama3Split =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| "
    "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
constexpr const char* kQwen2Split =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| "
    "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

// Lookups that never throw: a field of another JSON type than expected simply does not
// match (the tokenizer itself is validated by load_tokenizer_json).
bool has_string(const json& j, const char* key, const char* value) {
  if (!j.is_object()) return false;
  const auto it = j.find(key);
  return it != j.end() && it->is_string() && it->get_ref<const std::string&>() == value;
}
bool bool_or(const json& j, const char* key, bool fallback) {
  const auto it = j.find(key);
  return it != j.end() && it->is_boolean() ? it->get<bool>() : fallback;
}

// llama.cpp names pre-tokenizers by what they do; these are the structures of the
// tokenizer.json files it has a name for and we can recognise without running them.
std::string ggml_pre_tokenizer_name(const json& pre) {
  const auto byte_level = [](const json& j, bool regex) {
    return has_string(j, "type", "ByteLevel") && bool_or(j, "use_regex", true) == regex;
  };
  if (byte_level(pre, true)) return "gpt-2";
  if (!has_string(pre, "type", "Sequence")) return "default";
  const auto list = pre.find("pretokenizers");
  if (list == pre.end() || !list->is_array() || list->size() != 2) return "default";
  const json& first = (*list)[0];
  const json& second = (*list)[1];
  if (has_string(first, "type", "Digits") && bool_or(first, "individual_digits", false) &&
      byte_level(second, true))
    return "smollm";
  if (has_string(first, "type", "Split") && byte_level(second, false)) {
    const auto pattern = first.find("pattern");
    if (pattern == first.end() || !pattern->is_object()) return "default";
    if (has_string(*pattern, "Regex", kLlama3Split)) return "llama-bpe";
    if (has_string(*pattern, "Regex", kQwen2Split)) return "qwen2";
  }
  return "default";
}

}  // namespace

TokenizerJsonVocab read_tokenizer_json_vocab(const std::string& path) {
  const json doc = parse_json_file(path);
  const JsonNode root(doc, std::make_shared<const std::string>(path), "");
  if (!doc.is_object()) root.fail("expected a JSON object");
  const JsonNode model = root.at("model");
  TokenizerJsonVocab out;
  out.model_type = model.str_or("type", "");
  if (out.model_type != "BPE") return out;
  if (doc.contains("pre_tokenizer")) out.ggml_pre = ggml_pre_tokenizer_name(doc["pre_tokenizer"]);
  parse_vocab(model.at("vocab"),
              [&out](const std::string& token, int32_t id) { out.tokens[id] = token; });
  if (const auto a = root.find("added_tokens")) {
    for (size_t i = 0; i < a->size(); ++i) {
      AddedToken t = parse_added_token((*a)[i]);
      out.tokens[t.id] = std::move(t.content);
      out.added_special[t.id] = t.special;
    }
  }
  if (const auto merges = model.find("merges")) {
    std::vector<size_t> json_index;
    out.merges = parse_merges(*merges, &json_index);
  }
  // tokenizer_config.json names tokens by content: the lowest id that has it.
  std::unordered_map<std::string, int32_t> ids;
  for (const auto& [id, token] : out.tokens) ids.emplace(token, id);
  const auto id_of = [&ids](const std::optional<std::string>& token) -> std::optional<int32_t> {
    if (!token) return std::nullopt;
    const auto it = ids.find(*token);
    if (it == ids.end()) return std::nullopt;
    return it->second;
  };
  const std::optional<TokenizerConfig> config = read_tokenizer_config(path);
  if (config) {
    out.bos_id = id_of(config->bos);
    out.eos_id = id_of(config->eos);
    out.unk_id = id_of(config->unk);
    out.pad_id = id_of(config->pad);
    out.add_eos = config->add_eos;
    out.chat_template = config->chat_template;
  }
  if (!out.unk_id) out.unk_id = id_of(optional_string(model, "unk_token"));
  if (config && config->add_bos) {
    out.add_bos = *config->add_bos;
  } else if (const auto post = root.find("post_processor");
             post && post->value().is_object() &&
             post->str_or("type", "") == "TemplateProcessing") {
    const json& single = post->value().value("single", json());
    out.add_bos = single.is_array() && !single.empty() && single[0].contains("SpecialToken");
  }
  return out;
}

}  // namespace qlora::tokenizers
