// Unit tests of the tokenizers on small hand-built vocabularies. Parity with Hugging Face on
// real-model-shaped tokenizers is tests/python/test_tokenizer_parity.py.
#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "qlora/tokenizers/tokenizer.h"
#include "test_utils.h"

namespace {

namespace tk = qlora::tokenizers;
using nlohmann::json;
using qlora::test::expect_error;
using Ids = std::vector<int32_t>;

using qlora::test::TempDir;

void append_utf8(std::string& out, char32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

// GPT-2's bytes_to_unicode, written independently of the library: printable Latin-1 bytes map
// to themselves, the others to U+0100 upwards in byte order.
std::string alphabet_char(int byte) {
  const bool printable =
      (byte >= '!' && byte <= '~') || (byte >= 0xA1 && byte <= 0xAC) || byte >= 0xAE;
  int cp = byte;
  if (!printable) {
    cp = 256;
    for (int b = 0; b < byte; ++b) {
      if (!((b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE)) ++cp;
    }
  }
  std::string s;
  append_utf8(s, static_cast<char32_t>(cp));
  return s;
}

// A GPT-2-style tokenizer.json: the 256 byte characters are ids 0-255 (in byte order), then
// the merged tokens in merge order.
json byte_level_json(const std::vector<std::pair<std::string, std::string>>& merges) {
  json vocab = json::object();
  for (int b = 0; b < 256; ++b) vocab[alphabet_char(b)] = b;
  json merge_list = json::array();
  for (const auto& [a, b] : merges) {
    if (!vocab.contains(a + b)) vocab[a + b] = static_cast<int>(vocab.size());
    merge_list.push_back(json::array({a, b}));
  }
  return {
      {"version", "1.0"},
      {"added_tokens", json::array()},
      {"normalizer", nullptr},
      {"pre_tokenizer",
       {{"type", "ByteLevel"},
        {"add_prefix_space", false},
        {"trim_offsets", true},
        {"use_regex", true}}},
      {"post_processor", nullptr},
      {"decoder",
       {{"type", "ByteLevel"},
        {"add_prefix_space", true},
        {"trim_offsets", true},
        {"use_regex", true}}},
      {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", merge_list}}},
  };
}

json added_token(const std::string& content, int id, bool special) {
  return {{"id", id},        {"content", content},     {"single_word", false}, {"lstrip", false},
          {"rstrip", false}, {"normalized", !special}, {"special", special}};
}

// Adds an added token after the current largest id and returns its id.
int add_token(json& j, json token) {
  int id = static_cast<int>(j["model"]["vocab"].size());
  for (const json& t : j["added_tokens"]) id = std::max(id, t["id"].get<int>() + 1);
  token["id"] = id;
  j["added_tokens"].push_back(token);
  return id;
}

std::unique_ptr<tk::Tokenizer> load(TempDir& dir, const json& j) {
  return tk::load_tokenizer_json(dir.write("tokenizer.json", j.dump()));
}

int id_of(const tk::Tokenizer& t, const std::string& token) {
  const auto id = t.token_to_id(token);
  EXPECT_TRUE(id.has_value()) << token;
  return id.value_or(-1);
}

// ---- byte-level alphabet ----

TEST(ByteLevel, EveryByteMapsToItsAlphabetCharacter) {
  TempDir dir;
  const auto t = load(dir, byte_level_json({}));
  EXPECT_EQ(t->encode(" "), Ids({32}));
  EXPECT_EQ(t->id_to_token(32), std::optional<std::string>("\xC4\xA0"));    // U+0120 'Ġ'
  EXPECT_EQ(t->id_to_token(10), std::optional<std::string>("\xC4\x8A"));    // U+010A 'Ċ'
  EXPECT_EQ(t->id_to_token(0xAD), std::optional<std::string>("\xC5\x83"));  // U+0143 'Ń'
  EXPECT_EQ(t->encode("a\n"), Ids({'a', '\n'}));
  // A 4-byte character is its 4 bytes when no merge joins them.
  EXPECT_EQ(t->encode("\xF0\x9F\x99\x82"), Ids({0xF0, 0x9F, 0x99, 0x82}));
}

TEST(ByteLevel, DecodeInvertsEncode) {
  TempDir dir;
  const auto t = load(dir, byte_level_json({{"\xC4\xA0", "t"}, {"h", "e"}, {"\xC4\xA0t", "he"}}));
  std::string every_char;
  for (char32_t c = 1; c < 0x800; ++c) append_utf8(every_char, c);
  const std::vector<std::string> texts = {"",
                                          " the",
                                          "Hello, world!\n",
                                          "  two  spaces \t\r\n",
                                          "caf\xC3\xA9",
                                          "\xE6\x97\xA5\xE6\x9C\xAC",
                                          "\xF0\x9F\x91\xA9\xE2\x80\x8D\xF0\x9F\x91\xA7",
                                          every_char,
                                          std::string("nul\0byte", 8)};
  for (const std::string& text : texts) EXPECT_EQ(t->decode(t->encode(text)), text);
}

TEST(ByteLevel, InvalidUtf8IsRepairedAsPythonDoes) {
  TempDir dir;
  const auto t = load(dir, byte_level_json({}));
  // One U+FFFD per maximal invalid subsequence: "\xE2\x82" is one, "\xFF" another.
  EXPECT_EQ(t->decode(t->encode("a\xE2\x82\xFF"
                                "b")),
            "a\xEF\xBF\xBD\xEF\xBF\xBD"
            "b");
  // Bytes that do not form UTF-8 decode to U+FFFD too.
  EXPECT_EQ(t->decode({0xE2, 0x82}), "\xEF\xBF\xBD");
}

// ---- BPE merges ----

TEST(Bpe, LowerRankMergesFirst) {
  TempDir dir;
  const auto first_ab = load(dir, byte_level_json({{"a", "b"}, {"b", "c"}}));
  EXPECT_EQ(first_ab->encode("abc"), Ids({id_of(*first_ab, "ab"), 'c'}));
  const auto first_bc = load(dir, byte_level_json({{"b", "c"}, {"a", "b"}}));
  EXPECT_EQ(first_bc->encode("abc"), Ids({'a', id_of(*first_bc, "bc")}));
}

TEST(Bpe, EqualRanksMergeLeftmostFirst) {
  TempDir dir;
  const auto t = load(dir, byte_level_json({{"a", "a"}}));
  EXPECT_EQ(t->encode("aaa"), Ids({id_of(*t, "aa"), 'a'}));
  EXPECT_EQ(t->encode("aaaa"), Ids({id_of(*t, "aa"), id_of(*t, "aa")}));
}

TEST(Bpe, MergesChainThroughNewPairs) {
  TempDir dir;
  const auto t = load(dir, byte_level_json({{"b", "c"}, {"a", "bc"}, {"a", "b"}}));
  EXPECT_EQ(t->encode("abc"), Ids({id_of(*t, "abc")}));
  EXPECT_EQ(t->encode("ab"), Ids({id_of(*t, "ab")}));
}

TEST(Bpe, MergesAsStringsOrPairs) {
  TempDir dir;
  json j = byte_level_json({{"a", "b"}});
  j["model"]["merges"] = json::array({"#version: 0.2", "a b"});
  const auto t = load(dir, j);
  EXPECT_EQ(t->encode("ab"), Ids({id_of(*t, "ab")}));
}

TEST(Bpe, IgnoreMergesTakesWholeWordsFromTheVocabulary) {
  TempDir dir;
  json j = byte_level_json({{"a", "b"}});
  j["model"]["vocab"]["abc"] = 300;
  EXPECT_EQ(load(dir, j)->encode("abc"), Ids({256, 'c'}));  // "ab" is 256
  j["model"]["ignore_merges"] = true;
  EXPECT_EQ(load(dir, j)->encode("abc"), Ids({300}));
}

// ---- added and special tokens ----

TEST(AddedTokens, SpecialTokensAreMatchedBeforePreTokenization) {
  TempDir dir;
  json j = byte_level_json({});
  const int start = add_token(j, added_token("<|im_start|>", 0, true));
  const int longer = add_token(j, added_token("<|im_start|>x", 0, true));
  const auto t = load(dir, j);
  EXPECT_EQ(t->encode("a<|im_start|>b"), Ids({'a', start, 'b'}));
  // The longest token wins where two start at the same place.
  EXPECT_EQ(t->encode("<|im_start|>x"), Ids({longer}));
  EXPECT_EQ(t->encode("<|im_start"), Ids({'<', '|', 'i', 'm', '_', 's', 't', 'a', 'r', 't'}));
  EXPECT_TRUE(t->is_special(start));
  EXPECT_FALSE(t->is_special('a'));
  EXPECT_EQ(t->decode({'a', start, 'b'}), "a<|im_start|>b");
  EXPECT_EQ(t->decode({'a', start, 'b'}, true), "ab");
  EXPECT_EQ(t->vocab_size(), static_cast<size_t>(longer + 1));
}

TEST(AddedTokens, StripAndSingleWordOptions) {
  TempDir dir;
  json j = byte_level_json({});
  json mask = added_token("[M]", 0, false);
  mask["lstrip"] = mask["rstrip"] = mask["single_word"] = true;
  const int m = add_token(j, mask);
  const auto t = load(dir, j);
  EXPECT_EQ(t->encode("a  [M]  b"), Ids({'a', m, 'b'}));          // both runs of spaces swallowed
  EXPECT_EQ(t->encode("a[M]b"), Ids({'a', '[', 'M', ']', 'b'}));  // not a single word
  EXPECT_FALSE(t->is_special(m));
  EXPECT_EQ(t->decode({m}, true), "[M]");
}

TEST(AddedTokens, TemplateAddsBosAndEos) {
  TempDir dir;
  json j = byte_level_json({});
  const int bos = add_token(j, added_token("<s>", 0, true));
  const int eos = add_token(j, added_token("</s>", 0, true));
  j["post_processor"] = {
      {"type", "TemplateProcessing"},
      {"single", json::array({{{"SpecialToken", {{"id", "<s>"}, {"type_id", 0}}}},
                              {{"Sequence", {{"id", "A"}, {"type_id", 0}}}},
                              {{"SpecialToken", {{"id", "</s>"}, {"type_id", 0}}}}})},
      {"pair", json::array()},
      {"special_tokens",
       {{"<s>", {{"id", "<s>"}, {"ids", {bos}}, {"tokens", {"<s>"}}}},
        {"</s>", {{"id", "</s>"}, {"ids", {eos}}, {"tokens", {"</s>"}}}}}}};
  const auto t = load(dir, j);
  EXPECT_EQ(t->encode("a"), Ids({bos, 'a', eos}));
  EXPECT_EQ(t->encode("a", false), Ids({'a'}));
  EXPECT_EQ(t->encode(""), Ids({bos, eos}));
  EXPECT_TRUE(t->add_bos());
  EXPECT_TRUE(t->add_eos());
  EXPECT_EQ(t->bos_id(), bos);
  EXPECT_EQ(t->eos_id(), eos);
}

TEST(AddedTokens, TokenizerConfigNamesSpecialTokens) {
  TempDir dir;
  json j = byte_level_json({});
  const int end = add_token(j, added_token("<|end|>", 0, true));
  dir.write(
      "tokenizer_config.json",
      json{{"bos_token", "a"}, {"eos_token", {{"content", "<|end|>"}}}, {"add_bos_token", true}}
          .dump());
  const auto t = load(dir, j);
  EXPECT_EQ(t->bos_id(), 'a');
  EXPECT_EQ(t->eos_id(), end);
  // As in transformers 5, add_bos_token does not override tokenizer.json's post-processor.
  EXPECT_FALSE(t->add_bos());
  EXPECT_EQ(t->encode("b"), Ids({'b'}));
}

TEST(Encode, IsThreadSafe) {
  TempDir dir;
  const auto t = load(dir, byte_level_json({{"a", "b"}, {"ab", "c"}, {"\xC4\xA0", "ab"}}));
  std::vector<std::string> texts;
  for (int i = 0; i < 200; ++i)
    texts.push_back("abc ab " + std::to_string(i) + " abcabc" + std::string(i % 7, 'b'));
  std::vector<Ids> expected;
  for (const std::string& s : texts) expected.push_back(t->encode(s));
  std::vector<std::thread> threads;
  std::vector<int> failures(4, 0);
  for (int k = 0; k < 4; ++k) {
    threads.emplace_back([&, k]() {
      for (int round = 0; round < 20; ++round) {
        for (size_t i = 0; i < texts.size(); ++i) failures[k] += t->encode(texts[i]) != expected[i];
      }
    });
  }
  for (std::thread& th : threads) th.join();
  for (int f : failures) EXPECT_EQ(f, 0);
}

// ---- malformed tokenizer.json ----

TEST(Errors, NameTheFileAndTheKey) {
  TempDir dir;
  const std::string missing = "/tmp/qlora_no_such_dir/tokenizer.json";
  expect_error([&] { tk::load_tokenizer_json(missing); }, missing + ": cannot open");

  const std::string bad_json = dir.write("bad.json", "{\"model\": ");
  expect_error([&] { tk::load_tokenizer_json(bad_json); }, bad_json + ": not valid JSON");

  const std::string path = dir.write("tokenizer.json", "{}");
  expect_error([&] { tk::load_tokenizer_json(path); }, path + ": model: missing");

  json j = byte_level_json({{"a", "b"}});
  j["model"]["merges"][0] = "a b c";
  expect_error([&] { load(dir, j); }, "tokenizer.json: model.merges[0]: expected \"left right\"");

  j = byte_level_json({{"a", "b"}});
  j["model"]["merges"].push_back(json::array({"a", "zz"}));
  expect_error([&] { load(dir, j); },
               "tokenizer.json: model.merges[1]: token \"zz\" is not in the vocabulary");

  j = byte_level_json({});
  j["model"]["vocab"]["x"] = "one";
  expect_error([&] { load(dir, j); }, "model.vocab: \"x\": expected a non-negative integer id");

  j = byte_level_json({});
  j["model"]["type"] = "WordPiece";
  expect_error([&] { load(dir, j); }, "model.type: model \"WordPiece\" is not supported");

  j = byte_level_json({});
  j["pre_tokenizer"] = {{"type", "Whitespace"}};
  expect_error([&] { load(dir, j); },
               "pre_tokenizer.type: pre-tokenizer \"Whitespace\" is not supported");

  j = byte_level_json({});
  j["pre_tokenizer"] = {{"type", "Sequence"},
                        {"pretokenizers", json::array({{{"type", "Split"},
                                                        {"pattern", {{"Regex", "(unclosed"}}},
                                                        {"behavior", "Isolated"}}})}};
  expect_error([&] { load(dir, j); },
               "pre_tokenizer.pretokenizers[0].pattern.Regex: invalid regex");

  j = byte_level_json({});
  j["added_tokens"] = json::array({{{"id", 300}}});
  expect_error([&] { load(dir, j); }, "added_tokens[0].content: missing");

  j = byte_level_json({});
  j["normalizer"] = {{"type", "Lowercase"}};
  expect_error([&] { load(dir, j); }, "normalizer.type: normalizer \"Lowercase\" is not supported");
}

TEST(Errors, SentencePieceModel) {
  TempDir dir;
  const std::string path = dir.write("tokenizer.model", "not a protobuf");
  expect_error([&] { tk::load_sentencepiece(path); }, path + ": not a SentencePiece model");
}

// ---- GGUF vocabularies ----

tk::VocabSpec gpt2_spec() {
  tk::VocabSpec spec;
  spec.model = "gpt2";
  spec.pre = "llama-bpe";
  for (int b = 0; b < 256; ++b) spec.tokens.push_back(alphabet_char(b));
  spec.tokens.push_back("ab");
  spec.tokens.push_back("<|begin_of_text|>");
  spec.token_types.assign(spec.tokens.size(), 1);
  spec.token_types.back() = 3;
  spec.merges = {"a b"};
  spec.bos_id = 257;
  spec.add_bos = true;
  return spec;
}

TEST(GgufVocab, ByteLevel) {
  const auto t = tk::tokenizer_from_vocab(gpt2_spec());
  EXPECT_EQ(t->encode("ab<|begin_of_text|>a"), Ids({257, 256, 257, 'a'}));
  EXPECT_EQ(t->decode({257, 256, 257, 'a'}, true), "aba");
  EXPECT_TRUE(t->is_special(257));
  EXPECT_EQ(t->vocab_size(), 258u);
}

TEST(GgufVocab, Errors) {
  tk::VocabSpec spec = gpt2_spec();
  spec.pre = "mystery";
  expect_error([&] { tk::tokenizer_from_vocab(spec); },
               "tokenizer.ggml.pre: \"mystery\" is not supported");
  spec = gpt2_spec();
  spec.merges.push_back("a zz");
  expect_error([&] { tk::tokenizer_from_vocab(spec); },
               "tokenizer.ggml.merges[1]: token \"zz\" is not in the vocabulary");
  spec = gpt2_spec();
  spec.bos_id = 999;
  expect_error([&] { tk::tokenizer_from_vocab(spec); }, "tokenizer.ggml.bos_token_id: id 999");
  spec.model = "bert";
  expect_error([&] { tk::tokenizer_from_vocab(spec); },
               "tokenizer.ggml.model: \"bert\" is not supported");
}

// A SentencePiece BPE vocabulary: <unk> <s> </s>, byte pieces, then pieces by falling score.
tk::VocabSpec llama_spec() {
  tk::VocabSpec spec;
  spec.model = "llama";
  auto add = [&spec](const std::string& piece, float score, int type) {
    spec.tokens.push_back(piece);
    spec.scores.push_back(score);
    spec.token_types.push_back(type);
  };
  add("<unk>", 0, 2);
  add("<s>", 0, 3);
  add("</s>", 0, 3);
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof name, "<0x%02X>", b);
    add(name, 0, 6);
  }
  const std::string space = "\xE2\x96\x81";  // "▁"
  // Merged pieces, best first; single characters score lowest.
  for (const std::string& p : std::vector<std::string>{space + "a", "bc", space + "abc", "ab"}) {
    add(p, -static_cast<float>(spec.tokens.size()), 1);
  }
  for (const std::string& p : std::vector<std::string>{space, "a", "b", "c"}) {
    add(p, -1000.0f - static_cast<float>(spec.tokens.size()), 1);
  }
  spec.bos_id = 1;
  spec.eos_id = 2;
  spec.unk_id = 0;
  spec.add_bos = true;
  return spec;
}

TEST(GgufVocab, SentencePieceBpeMergesByScore) {
  const tk::VocabSpec spec = llama_spec();
  const auto t = tk::tokenizer_from_vocab(spec);
  const auto id = [&t](const std::string& piece) { return id_of(*t, piece); };
  const std::string space = "\xE2\x96\x81";
  // "▁abc": "▁a" scores best, then "bc", then "▁abc".
  EXPECT_EQ(t->encode("abc", false), Ids({id(space + "abc")}));
  EXPECT_EQ(t->encode("abc"), Ids({1, id(space + "abc")}));
  // "▁ab": "▁a" + "b"; the dummy prefix comes again after a control token.
  EXPECT_EQ(t->encode("ab</s>ab", false),
            Ids({id(space + "a"), id("b"), 2, id(space + "a"), id("b")}));
  // Characters outside the vocabulary fall back to their bytes.
  EXPECT_EQ(t->encode("\xC3\xA9", false), Ids({id(space), 3 + 0xC3, 3 + 0xA9}));
  // Only the text's leading space goes: "<s>" comes first here.
  EXPECT_EQ(t->decode(t->encode("ab\xC3\xA9 c")), "<s> ab\xC3\xA9 c");
  EXPECT_EQ(t->decode(t->encode("ab\xC3\xA9 c"), true), "ab\xC3\xA9 c");
  EXPECT_TRUE(t->is_special(1));
  EXPECT_FALSE(t->is_special(3));
}

TEST(GgufVocab, SentencePieceUnusedPiecesAreSplitAgain) {
  tk::VocabSpec spec = llama_spec();
  const auto abc = std::find(spec.tokens.begin(), spec.tokens.end(),
                             "\xE2\x96\x81"
                             "abc") -
                   spec.tokens.begin();
  spec.token_types[abc] = 5;  // unused: formed while merging, then split back
  const auto t = tk::tokenizer_from_vocab(spec);
  EXPECT_EQ(t->encode("abc", false), Ids({id_of(*t,
                                                "\xE2\x96\x81"
                                                "a"),
                                          id_of(*t, "bc")}));
}

TEST(GgufVocab, SentencePieceErrors) {
  tk::VocabSpec spec = llama_spec();
  spec.scores.pop_back();
  expect_error([&] { tk::tokenizer_from_vocab(spec); }, "tokenizer.ggml.scores:");
  spec = llama_spec();
  spec.token_types[5] = 9;
  expect_error([&] { tk::tokenizer_from_vocab(spec); },
               "tokenizer.ggml.token_type[5]: unknown type 9");
}

// ---- SentencePiece tokenizer.model files, written here byte by byte ----

// Just enough of protobuf's encoder to write sentencepiece.ModelProto files.
std::string pb_varint(uint64_t v) {
  std::string out;
  do {
    out += static_cast<char>((v & 0x7F) | (v > 0x7F ? 0x80 : 0));
    v >>= 7;
  } while (v != 0);
  return out;
}
std::string pb_key(int field, int wire_type) {
  return pb_varint(static_cast<uint64_t>(field) << 3 | static_cast<uint64_t>(wire_type));
}
std::string pb_uint(int field, uint64_t v) { return pb_key(field, 0) + pb_varint(v); }
std::string pb_bytes(int field, const std::string& s) {
  return pb_key(field, 2) + pb_varint(s.size()) + s;
}
std::string pb_float(int field, float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  std::string out = pb_key(field, 5);
  for (int i = 0; i < 4; ++i) out += static_cast<char>(bits >> (8 * i) & 0xFF);
  return out;
}

// The three parts of a ModelProto: the pieces (fields 1), and the bodies of trainer_spec and
// normalizer_spec.
struct SpmFile {
  std::string pieces, trainer, normalizer;
  std::string bytes() const { return pieces + pb_bytes(2, trainer) + pb_bytes(3, normalizer); }
};

std::string piece_message(const std::string& piece, float score, int type) {
  return pb_bytes(1, piece) + pb_float(2, score) + pb_uint(3, static_cast<uint64_t>(type));
}

// The tokenizer.model of a vocabulary, as the trainer writes Llama 2's: BPE, byte fallback,
// the "identity" normalizer with the dummy prefix and without remove_extra_whitespaces.
SpmFile spm_file(const tk::VocabSpec& spec, bool byte_fallback = true) {
  SpmFile f;
  for (size_t i = 0; i < spec.tokens.size(); ++i) {
    f.pieces += pb_bytes(1, piece_message(spec.tokens[i], spec.scores[i], spec.token_types[i]));
  }
  f.trainer = pb_bytes(2, "tokenizer") + pb_uint(3, 2) + pb_uint(35, byte_fallback ? 1 : 0) +
              pb_uint(40, 0) + pb_uint(41, 1) + pb_uint(42, 2) +
              pb_uint(43, static_cast<uint64_t>(-1));  // pad_id -1: a 10-byte varint
  f.normalizer = pb_bytes(1, "identity") + pb_uint(3, 1) + pb_uint(4, 0) + pb_uint(5, 1);
  return f;
}

TEST(SentencePieceModel, EncodesAsTheSameGgufVocabulary) {
  TempDir dir;
  const tk::VocabSpec spec = llama_spec();
  const auto t = tk::load_sentencepiece(dir.write("tokenizer.model", spm_file(spec).bytes()));
  const auto g = tk::tokenizer_from_vocab(spec);
  for (const std::string text :
       {"abc", "ab</s>ab", "ab\xC3\xA9 c", " a  bc ", "<s><unk>x", "\xFF"}) {
    for (const bool special : {true, false}) {
      EXPECT_EQ(t->encode(text, special), g->encode(text, special)) << text;
    }
    EXPECT_EQ(t->decode(t->encode(text)), g->decode(g->encode(text))) << text;
  }
  EXPECT_EQ(t->encode("abc"), Ids({1, id_of(*t,
                                            "\xE2\x96\x81"
                                            "abc")}));
  EXPECT_EQ(t->vocab_size(), spec.tokens.size());
  EXPECT_EQ(t->bos_id(), 1);
  EXPECT_EQ(t->eos_id(), 2);
  EXPECT_EQ(t->unk_id(), 0);
  EXPECT_EQ(t->pad_id(), std::nullopt);
  EXPECT_TRUE(t->add_bos());
  EXPECT_FALSE(t->add_eos());
  EXPECT_TRUE(t->is_special(2));
}

TEST(SentencePieceModel, SkipsUnknownFieldsOfEveryWireType) {
  TempDir dir;
  const std::string unknown = pb_uint(99, 7) + pb_key(98, 1) + std::string(8, '\x01') +
                              pb_bytes(97, "xyz") + pb_float(96, 1.5f) + pb_uint(50000, 1);
  SpmFile f = spm_file(llama_spec());
  f.trainer += unknown;
  f.normalizer = unknown + f.normalizer;
  const size_t unk_size = pb_bytes(1, piece_message("<unk>", 0, 2)).size();
  f.pieces = pb_bytes(1, piece_message("<unk>", 0, 2) + unknown) + f.pieces.substr(unk_size);
  const auto t = tk::load_sentencepiece(dir.write("a.model", unknown + f.bytes() + unknown));
  EXPECT_EQ(t->encode("abc", false), Ids({id_of(*t,
                                                "\xE2\x96\x81"
                                                "abc")}));
  EXPECT_EQ(t->vocab_size(), llama_spec().tokens.size());
}

TEST(SentencePieceModel, NormalizerSpec) {
  TempDir dir;
  const std::string space = "\xE2\x96\x81";
  SpmFile f = spm_file(llama_spec());
  const auto llama = tk::load_sentencepiece(dir.write("llama.model", f.bytes()));
  EXPECT_NE(llama->encode("  a   bc  ", false), llama->encode("a bc", false));

  // add_dummy_prefix false: no "▁" before the text.
  f.normalizer = pb_bytes(1, "identity") + pb_uint(3, 0) + pb_uint(4, 0);
  const auto no_prefix = tk::load_sentencepiece(dir.write("no_prefix.model", f.bytes()));
  EXPECT_EQ(no_prefix->encode("abc", false),
            Ids({id_of(*no_prefix, "a"), id_of(*no_prefix, "bc")}));
  EXPECT_EQ(no_prefix->decode({id_of(*no_prefix, space + "a")}), " a");  // nothing stripped

  // remove_extra_whitespaces (true when absent): leading, trailing and repeated spaces go.
  f.normalizer = pb_bytes(1, "identity");
  const auto collapsing = tk::load_sentencepiece(dir.write("collapsing.model", f.bytes()));
  EXPECT_EQ(collapsing->encode("  a   bc  ", false), llama->encode("a bc", false));
  EXPECT_EQ(collapsing->encode("   ", false), Ids({}));
  EXPECT_EQ(collapsing->encode("  abc", false), Ids({id_of(*collapsing, space + "abc")}));
}

TEST(SentencePieceModel, TokenizerConfigNextToTheModel) {
  TempDir dir;
  const std::string path = dir.write("tokenizer.model", spm_file(llama_spec()).bytes());
  dir.write("tokenizer_config.json",
            json{{"add_bos_token", false}, {"add_eos_token", true}, {"pad_token", "</s>"}}.dump());
  const auto t = tk::load_sentencepiece(path);
  EXPECT_FALSE(t->add_bos());
  EXPECT_TRUE(t->add_eos());
  EXPECT_EQ(t->pad_id(), 2);
  EXPECT_EQ(t->encode("abc"), Ids({id_of(*t,
                                         "\xE2\x96\x81"
                                         "abc"),
                                   2}));
}

// Where libsentencepiece and llama.cpp differ, a tokenizer.model follows libsentencepiece.
TEST(SentencePieceModel, FollowsLibsentencepieceWhereLlamaCppDiffers) {
  TempDir dir;
  tk::VocabSpec spec;
  spec.model = "llama";
  const std::string space = "\xE2\x96\x81";
  const std::vector<std::tuple<std::string, float, int>> pieces = {
      {"<unk>", 0, 2},        {"<s>", 0, 3},  {"</s>", 0, 3}, {space + space, 0, 4},
      {space + "a", 1.0f, 1}, {space, -5, 1}, {"a", -5, 1},   {"b", -5, 1}};
  for (const auto& [piece, score, type] : pieces) {
    spec.tokens.push_back(piece);
    spec.scores.push_back(score);
    spec.token_types.push_back(type);
  }
  spec.unk_id = 0;
  const auto t = tk::load_sentencepiece(dir.write("t.model", spm_file(spec, false).bytes()));
  const auto g = tk::tokenizer_from_vocab(spec);
  // A user-defined piece in the normalized text is one symbol that never merges.
  EXPECT_EQ(t->encode(" a", false), Ids({3, 6}));
  EXPECT_EQ(g->encode(" a", false), Ids({5, 4}));
  // Without byte fallback, a run of unknown characters is one <unk>.
  EXPECT_EQ(t->encode("a\xC3\xA9\xC3\xA9", false), Ids({4, 0}));
  EXPECT_EQ(g->encode("a\xC3\xA9\xC3\xA9", false), Ids({4, 0, 0}));
  EXPECT_EQ(t->encode("\xC3\xA9"
                      "a\xC3\xA9",
                      false),
            Ids({5, 0, 6, 0}));
}

TEST(SentencePieceModel, MalformedFilesNameTheByte) {
  TempDir dir;
  const std::string path = dir.write("tokenizer.model", "");
  auto load_bytes = [&](const std::string& bytes) {
    dir.write("tokenizer.model", bytes);
    tk::load_sentencepiece(path);
  };
  const std::string prefix = path + ": not a SentencePiece model: ";
  const SpmFile f = spm_file(llama_spec());
  const std::string good = f.bytes();

  // Truncated: normalizer_spec's length runs past the end of the file.
  const size_t normalizer_length_at = f.pieces.size() + pb_bytes(2, f.trainer).size() + 1;
  expect_error([&] { load_bytes(good.substr(0, good.size() - 2)); },
               prefix + "byte " + std::to_string(normalizer_length_at) +
                   ": ModelProto.normalizer_spec: length " + std::to_string(f.normalizer.size()) +
                   " runs past the end of the message (" + std::to_string(f.normalizer.size() - 2) +
                   " bytes left)");
  // Truncated where a message ends: what is missing is named.
  expect_error([&] { load_bytes(f.pieces); }, prefix + "no trainer_spec");
  expect_error([&] { load_bytes(f.pieces + pb_bytes(2, f.trainer)); },
               prefix + "no normalizer_spec");
  expect_error([&] { load_bytes(""); }, prefix + "no pieces");
  // Truncated inside a varint, and inside a fixed32 of a piece.
  expect_error([&] { load_bytes(good + pb_key(9, 0) + "\x80"); },
               prefix + "byte " + std::to_string(good.size() + 1) +
                   ": ModelProto field 9: truncated varint");
  expect_error(
      [&] { load_bytes(pb_bytes(1, pb_bytes(1, "a") + pb_key(2, 5) + "\x01\x02") + good); },
      prefix + "byte 6: pieces[0].score: truncated 32-bit value (2 bytes left in the message)");

  // Bad varints: longer than 10 bytes, or a 10th byte above 1.
  expect_error([&] { load_bytes(std::string(11, '\xFF')); },
               prefix + "byte 0: ModelProto: varint longer than 64 bits");
  expect_error([&] { load_bytes(pb_key(9, 0) + std::string(9, '\x80') + "\x02"); },
               prefix + "byte 1: ModelProto field 9: varint longer than 64 bits");

  // Wrong wire types: for a known field, and ones protobuf does not have (or we do not read).
  expect_error([&] { load_bytes(pb_bytes(1, pb_bytes(1, "a") + pb_uint(2, 5)) + good); },
               prefix + "byte 5: pieces[0].score: wire type 0 (varint), expected 5 (32-bit)");
  expect_error([&] { load_bytes(pb_uint(2, 1) + good); },
               prefix + "byte 0: ModelProto.trainer_spec: wire type 0 (varint), expected 2");
  expect_error([&] { load_bytes(good + pb_key(7, 3)); },
               prefix + "byte " + std::to_string(good.size()) +
                   ": ModelProto field 7: groups (wire type 3/4) are not supported");
  expect_error([&] { load_bytes(pb_key(7, 6) + good); },
               prefix + "byte 0: ModelProto field 7: invalid wire type 6");
  expect_error([&] { load_bytes(pb_key(0, 0) + good); },
               prefix + "byte 0: ModelProto: invalid field number 0");
}

TEST(SentencePieceModel, UnsupportedModelsAreRefused) {
  TempDir dir;
  const std::string path = dir.write("tokenizer.model", "");
  auto load_file = [&](const SpmFile& f) {
    dir.write("tokenizer.model", f.bytes());
    tk::load_sentencepiece(path);
  };
  SpmFile f = spm_file(llama_spec());
  f.trainer += pb_uint(3, 1);  // the last value of a field wins
  expect_error([&] { load_file(f); },
               path + ": trainer_spec.model_type: UNIGRAM models are not supported");
  f.trainer = pb_uint(35, 1);  // model_type absent: UNIGRAM, protobuf's default
  expect_error([&] { load_file(f); }, "UNIGRAM models are not supported");
  f.trainer = pb_uint(3, 4) + pb_uint(35, 1);
  expect_error([&] { load_file(f); }, "CHAR models are not supported");

  f = spm_file(llama_spec());
  f.normalizer = pb_bytes(1, "nmt_nfkc") + pb_bytes(2, std::string(64, '\x01'));
  expect_error([&] { load_file(f); },
               path +
                   ": normalizer_spec: the normalization rule \"nmt_nfkc\" (a 64-byte "
                   "precompiled_charsmap) is not supported");
  f.normalizer = pb_uint(5, 0);
  expect_error([&] { load_file(f); }, "normalizer_spec.escape_whitespaces: false is not supported");
  f = spm_file(llama_spec());
  f.trainer += pb_uint(24, 1);
  expect_error([&] { load_file(f); }, "treat_whitespace_as_suffix: true is not supported");

  // Pieces libsentencepiece refuses too.
  f = spm_file(llama_spec(), false);
  expect_error([&] { load_file(f); },
               "pieces[3] \"<0x00>\": a byte piece, but trainer_spec.byte_fallback is false");
  f = spm_file(llama_spec());
  f.pieces += pb_bytes(1, piece_message("ab", 0, 1));
  expect_error([&] { load_file(f); }, "\"ab\": the same piece as pieces[");
  f = spm_file(llama_spec());
  f.pieces += pb_bytes(1, piece_message("zz", 0, 9));
  expect_error([&] { load_file(f); }, "\"zz\": unknown type 9");
  f = spm_file(llama_spec());
  f.pieces = f.pieces.substr(pb_bytes(1, piece_message("<unk>", 0, 2)).size());  // no <unk>
  expect_error([&] { load_file(f); }, path + ": pieces: no unknown piece");
}

}  // namespace
