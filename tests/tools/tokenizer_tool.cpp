// Command-line bridge for the Python tokenizer parity tests:
//   tokenizer_tool encode SOURCE [--no-special]    stdin: JSON array of strings;
//                                                  stdout: JSON array of id arrays
//   tokenizer_tool decode SOURCE [--skip-special]  stdin: JSON array of id arrays;
//                                                  stdout: JSON array of strings
//   tokenizer_tool info SOURCE                     stdout: JSON object (vocab size, special ids)
//   tokenizer_tool bench SOURCE                    stdin: JSON array of strings; stdout: JSON
//                                                  {"bytes", "tokens", "seconds"} of one encode
//                                                  pass
// SOURCE is a tokenizer.json, a SentencePiece .model, or vocab:FILE where FILE is a JSON object
// holding the GGUF tokenizer metadata as VocabSpec names it ({"model", "pre", "tokens", "scores",
// "token_types", "merges", "bos_id", "eos_id", "unk_id", "pad_id", "add_bos", "add_eos",
// "add_space_prefix"}).
// Exits 0 on success, 1 with the error on stderr, 2 on bad usage.
#include <chrono>
#include <fstream>
#include <iostream>
#include <iterator>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "qlora/tokenizers/tokenizer.h"
#include "util/strings.h"

namespace {

namespace tk = qlora::tokenizers;
using nlohmann::json;

using qlora::util::ends_with;

std::optional<int32_t> optional_id(const json& j, const char* key) {
  if (!j.contains(key) || j[key].is_null()) return std::nullopt;
  return j[key].get<int32_t>();
}

tk::VocabSpec read_vocab_spec(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error(path + ": cannot open");
  const json j = json::parse(in);
  tk::VocabSpec spec;
  spec.model = j.at("model").get<std::string>();
  spec.pre = j.value("pre", "");
  spec.tokens = j.at("tokens").get<std::vector<std::string>>();
  spec.scores = j.value("scores", std::vector<float>{});
  spec.token_types = j.value("token_types", std::vector<int32_t>{});
  spec.merges = j.value("merges", std::vector<std::string>{});
  spec.bos_id = optional_id(j, "bos_id");
  spec.eos_id = optional_id(j, "eos_id");
  spec.unk_id = optional_id(j, "unk_id");
  spec.pad_id = optional_id(j, "pad_id");
  spec.add_bos = j.value("add_bos", false);
  spec.add_eos = j.value("add_eos", false);
  spec.add_space_prefix = j.value("add_space_prefix", true);
  return spec;
}

std::unique_ptr<tk::Tokenizer> load(const std::string& source) {
  if (source.rfind("vocab:", 0) == 0)
    return tk::tokenizer_from_vocab(read_vocab_spec(source.substr(6)));
  if (ends_with(source, ".json")) return tk::load_tokenizer_json(source);
  return tk::load_sentencepiece(source);
}

json read_stdin_json() {
  const std::string text((std::istreambuf_iterator<char>(std::cin)),
                         std::istreambuf_iterator<char>());
  return json::parse(text);
}

void write_json(const json& j) {
  // Decoded text is valid UTF-8 by construction; replace just in case rather than abort.
  std::cout << j.dump(-1, ' ', false, json::error_handler_t::replace) << '\n';
}

json optional_json(const std::optional<int32_t>& id) { return id ? json(*id) : json(nullptr); }

void encode(const tk::Tokenizer& tokenizer, bool add_special) {
  json out = json::array();
  for (const json& text : read_stdin_json())
    out.push_back(tokenizer.encode(text.get<std::string>(), add_special));
  write_json(out);
}

void decode(const tk::Tokenizer& tokenizer, bool skip_special) {
  json out = json::array();
  for (const json& ids : read_stdin_json()) {
    out.push_back(tokenizer.decode(ids.get<std::vector<int32_t>>(), skip_special));
  }
  write_json(out);
}

void info(const tk::Tokenizer& tokenizer) {
  write_json({{"vocab_size", tokenizer.vocab_size()},
              {"bos_id", optional_json(tokenizer.bos_id())},
              {"eos_id", optional_json(tokenizer.eos_id())},
              {"pad_id", optional_json(tokenizer.pad_id())},
              {"unk_id", optional_json(tokenizer.unk_id())},
              {"add_bos", tokenizer.add_bos()},
              {"add_eos", tokenizer.add_eos()}});
}

void bench(const tk::Tokenizer& tokenizer) {
  std::vector<std::string> texts;
  size_t bytes = 0;
  for (const json& text : read_stdin_json()) {
    texts.push_back(text.get<std::string>());
    bytes += texts.back().size();
  }
  const auto start = std::chrono::steady_clock::now();
  size_t tokens = 0;
  for (const std::string& text : texts) tokens += tokenizer.encode(text, false).size();
  const std::chrono::duration<double> elapsed = std::chrono::steady_clock::now() - start;
  write_json({{"bytes", bytes}, {"tokens", tokens}, {"seconds", elapsed.count()}});
}

int usage() {
  std::cerr << "usage: tokenizer_tool encode SOURCE [--no-special] | decode SOURCE [--skip-special]"
               " | info SOURCE | bench SOURCE\n"
               "  SOURCE: tokenizer.json, a SentencePiece .model, or vocab:FILE.json\n";
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  const std::vector<std::string> args(argv + 1, argv + argc);
  if (args.size() < 2 || args.size() > 3) return usage();
  const std::string& command = args[0];
  const std::string flag = args.size() == 3 ? args[2] : "";
  try {
    const std::unique_ptr<tk::Tokenizer> tokenizer = load(args[1]);
    if (command == "encode" && (flag.empty() || flag == "--no-special")) {
      encode(*tokenizer, flag.empty());
    } else if (command == "decode" && (flag.empty() || flag == "--skip-special")) {
      decode(*tokenizer, !flag.empty());
    } else if (command == "info" && flag.empty()) {
      info(*tokenizer);
    } else if (command == "bench" && flag.empty()) {
      bench(*tokenizer);
    } else {
      return usage();
    }
  } catch (const std::exception& e) {
    std::cerr << "tokenizer_tool: " << e.what() << '\n';
    return 1;
  }
  return 0;
}
