// SentencePiece tokenizers (Llama 2, Mistral): a tokenizer.model, read here (spm_model_proto.cpp)
// without libsentencepiece, and the same vocabulary as a GGUF file stores it
// (tokenizer.ggml.model "llama"). Both run the SentencePiece BPE algorithm implemented here.
//
// Both behave as Hugging Face's converted Llama tokenizers (legacy mode) and llama.cpp do:
// control, unknown and user-defined pieces written in the text are matched first, and each
// stretch of text between them is encoded separately with its own "▁" dummy prefix; a
// tokenizer.model encodes each stretch exactly as libsentencepiece's Encode does.
// Decoding is Hugging Face's: "▁" -> " ", <0xXX> pieces -> bytes, one leading space dropped.
//
// (libsentencepiece itself is not used: it carries its own copy of protobuf-lite and calls it
// through interposable symbols, which bind to LibTorch's different protobuf when both are
// loaded.)
#include <sys/stat.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <queue>
#include <unordered_map>
#include <unordered_set>
#include <utility>

#include "qlora/tokenizers/tokenizer.h"
#include "tokenizers/added_vocabulary.h"
#include "tokenizers/gguf_vocab.h"
#include "tokenizers/spm_model_proto.h"
#include "tokenizers/tokenizer_config.h"
#include "tokenizers/unicode.h"

namespace qlora::tokenizers {
namespace {

using detail::AddedToken;
using detail::AddedVocabulary;
using detail::Segment;

const char* const kSpace = "\xE2\x96\x81";  // U+2581, SentencePiece's whitespace marker

using PieceType = GgufTokenType;  // SentencePiece's ModelProto types have the same values

std::string byte_piece(unsigned char b) {
  static const char* const kHex = "0123456789ABCDEF";
  return std::string("<0x") + kHex[b >> 4] + kHex[b & 15] + ">";
}

// The vocabulary both tokenizers decode with and match special pieces from.
struct SpmVocab {
  std::vector<std::string> pieces;
  std::vector<PieceType> types;
  std::unordered_map<std::string, int32_t> ids;

  void index() {
    ids.reserve(pieces.size());
    // The first of repeated pieces wins, as in SentencePiece's InsertIfNotPresent.
    for (size_t i = 0; i < pieces.size(); ++i) ids.emplace(pieces[i], static_cast<int32_t>(i));
  }

  std::optional<int32_t> find(std::string_view piece) const {
    const auto it = ids.find(std::string(piece));
    if (it == ids.end()) return std::nullopt;
    return it->second;
  }

  // Control and unknown pieces are special (Hugging Face's converter marks them so);
  // user-defined pieces are added tokens that decoding keeps.
  std::vector<AddedToken> added_tokens() const {
    std::vector<AddedToken> out;
    for (size_t i = 0; i < pieces.size(); ++i) {
      const PieceType t = types[i];
      if (t != PieceType::kControl && t != PieceType::kUnknown && t != PieceType::kUserDefined) {
        continue;
      }
      AddedToken token;
      token.content = pieces[i];
      token.id = static_cast<int32_t>(i);
      token.special = t != PieceType::kUserDefined;
      out.push_back(std::move(token));
    }
    return out;
  }
};

struct SpecialConfig {
  std::optional<int32_t> bos, eos, pad, unk;
  bool add_bos = true;  // Llama 2 and Mistral start with <s>
  bool add_eos = false;
  bool add_dummy_prefix = true;
};

// Everything but the encoding of plain text, which the two tokenizers do differently.
class SpmTokenizerBase : public Tokenizer {
 public:
  SpmTokenizerBase(SpmVocab vocab, SpecialConfig config)
      : vocab_(std::move(vocab)), config_(config) {
    added_.build(vocab_.added_tokens(), nullptr);
  }

  std::vector<int32_t> encode(std::string_view text, bool add_special_tokens) const override {
    std::string repaired;
    if (!detail::utf8_valid(text)) text = repaired = detail::utf8_lossy(text);
    std::vector<int32_t> ids;
    if (add_special_tokens && add_bos()) ids.push_back(*config_.bos);
    for (const Segment& segment : added_.split(text, nullptr)) {
      if (segment.id >= 0) {
        ids.push_back(segment.id);
      } else {
        encode_text(segment.text, ids);
      }
    }
    if (add_special_tokens && add_eos()) ids.push_back(*config_.eos);
    return ids;
  }

  // Hugging Face's Llama decoder: Replace("▁", " "), ByteFallback, Fuse, Strip(" ", 1, 0).
  std::string decode(const std::vector<int32_t>& ids, bool skip_special_tokens) const override {
    std::string out;
    std::string bytes;  // consecutive byte pieces
    auto flush = [&]() {
      if (detail::utf8_valid(bytes)) {
        out += bytes;
      } else {
        for (size_t i = 0; i < bytes.size(); ++i) out += "\xEF\xBF\xBD";
      }
      bytes.clear();
    };
    for (const int32_t id : ids) {
      if (id < 0 || static_cast<size_t>(id) >= vocab_.pieces.size()) continue;
      if (skip_special_tokens && is_special(id)) continue;
      const std::string& piece = vocab_.pieces[id];
      if (const auto b = byte_value(piece)) {
        bytes += static_cast<char>(*b);
        continue;
      }
      flush();
      out += replace_markers(piece);
    }
    flush();
    if (config_.add_dummy_prefix && !out.empty() && out[0] == ' ') out.erase(0, 1);
    return out;
  }

  size_t vocab_size() const override { return vocab_.pieces.size(); }
  std::optional<int32_t> token_to_id(std::string_view token) const override {
    return vocab_.find(token);
  }
  std::optional<std::string> id_to_token(int32_t id) const override {
    if (id < 0 || static_cast<size_t>(id) >= vocab_.pieces.size()) return std::nullopt;
    return vocab_.pieces[id];
  }
  std::optional<int32_t> bos_id() const override { return config_.bos; }
  std::optional<int32_t> eos_id() const override { return config_.eos; }
  std::optional<int32_t> pad_id() const override { return config_.pad; }
  std::optional<int32_t> unk_id() const override { return config_.unk; }
  bool add_bos() const override { return config_.add_bos && config_.bos.has_value(); }
  bool add_eos() const override { return config_.add_eos && config_.eos.has_value(); }
  bool is_special(int32_t id) const override {
    if (id < 0 || static_cast<size_t>(id) >= vocab_.types.size()) return false;
    return vocab_.types[id] == PieceType::kControl || vocab_.types[id] == PieceType::kUnknown;
  }

 protected:
  // Encodes one stretch of text between added tokens, dummy prefix included.
  virtual void encode_text(std::string_view text, std::vector<int32_t>& out) const = 0;

  const SpmVocab& vocab() const { return vocab_; }
  const SpecialConfig& config() const { return config_; }

 private:
  static std::string replace_markers(const std::string& piece) {
    std::string out;
    for (size_t pos = 0;;) {
      const size_t hit = piece.find(kSpace, pos);
      out.append(piece, pos, hit == std::string::npos ? std::string::npos : hit - pos);
      if (hit == std::string::npos) return out;
      out += ' ';
      pos = hit + std::strlen(kSpace);
    }
  }

  static int hex(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  }

  static std::optional<unsigned char> byte_value(const std::string& piece) {
    if (piece.size() != 6 || piece.compare(0, 3, "<0x") != 0 || piece[5] != '>') {
      return std::nullopt;
    }
    const int hi = hex(piece[3]), lo = hex(piece[4]);
    if (hi < 0 || lo < 0) return std::nullopt;
    return static_cast<unsigned char>(hi * 16 + lo);
  }

  SpmVocab vocab_;
  SpecialConfig config_;
  AddedVocabulary added_;
};

// Overrides from a transformers tokenizer_config.json next to the tokenizer file.
void apply_tokenizer_config(const std::string& path, const SpmVocab& vocab, SpecialConfig& c) {
  const std::optional<detail::TokenizerConfig> config = detail::read_tokenizer_config(path);
  if (!config) return;
  auto id_of = [&vocab](const std::optional<std::string>& token, std::optional<int32_t>& id) {
    if (!token) return;
    if (const auto found = vocab.find(*token)) id = found;
  };
  id_of(config->bos, c.bos);
  id_of(config->eos, c.eos);
  id_of(config->pad, c.pad);
  id_of(config->unk, c.unk);
  if (config->add_bos) c.add_bos = *config->add_bos;
  if (config->add_eos) c.add_eos = *config->add_eos;
}

// How a tokenizer.model encodes where llama.cpp, whose behaviour a GGUF vocabulary gets, differs
// from libsentencepiece. The defaults are llama.cpp's.
struct SpmOptions {
  // NormalizerSpec.remove_extra_whitespaces: drop leading and trailing spaces, collapse runs.
  bool remove_extra_whitespaces = false;
  // Without byte fallback, a run of unknown pieces becomes one unknown id
  // (SentencePieceProcessor::PopulateSentencePieceText).
  bool fuse_unknown = false;
  // User-defined pieces found in the text BPE sees are single symbols that never merge
  // (bpe_model.cc's PrefixMatcher).
  bool freeze_user_defined = false;
  // The id unknown pieces become: libsentencepiece's is the UNKNOWN piece, whichever piece
  // trainer_spec.unk_piece names. By default the tokenizer's unk id.
  std::optional<int32_t> unknown_id;
};

// ---------------------------------------------------------------------------------------------
// SentencePiece BPE (bpe_model.cc's Encode, with its resegmentation of unused pieces and
// SentencePieceProcessor's byte fallback)

class SpmBpe {
 public:
  SpmBpe(const SpmVocab& vocab, const std::vector<float>& scores, std::optional<int32_t> unk_id,
         const SpmOptions& options)
      : vocab_(vocab), scores_(scores), unk_id_(unk_id), fuse_unknown_(options.fuse_unknown) {
    bool any_byte = false;
    byte_ids_.fill(-1);
    for (int b = 0; b < 256; ++b) {
      if (const auto id = vocab.find(byte_piece(static_cast<unsigned char>(b)))) {
        if (vocab.types[*id] == PieceType::kByte) byte_ids_[b] = *id, any_byte = true;
      }
    }
    byte_fallback_ = any_byte;
    if (options.freeze_user_defined) {
      for (size_t i = 0; i < vocab.pieces.size(); ++i) {
        // Only user-defined pieces holding "▁" can be in the text BPE sees: the added-token
        // split has taken every occurrence of the others out of it, and normalization only
        // adds "▁" (for spaces and the dummy prefix) and removes spaces.
        const std::string& piece = vocab.pieces[i];
        if (vocab.types[i] == PieceType::kUserDefined && piece.find(kSpace) != std::string::npos) {
          frozen_.insert(piece);
          frozen_lengths_.push_back(piece.size());
        }
      }
      std::sort(frozen_lengths_.rbegin(), frozen_lengths_.rend());
      frozen_lengths_.erase(std::unique(frozen_lengths_.begin(), frozen_lengths_.end()),
                            frozen_lengths_.end());
    }
  }

  void encode(const std::string& text, std::vector<int32_t>& out) const {
    Session session{this, text, {}, {}, {}, false};
    session.run(out);
  }

 private:
  struct Symbol {
    int32_t prev, next;
    size_t start, len;  // len 0 once merged into its left neighbour
    bool frozen;        // a user-defined piece: never merged
  };
  struct Pair {
    float score;
    int32_t left, right;
    size_t size;
  };
  // Highest score first, then leftmost (bpe_model.cc's SymbolPairComparator).
  struct PairAfter {
    bool operator()(const Pair& a, const Pair& b) const {
      return a.score < b.score || (a.score == b.score && a.left > b.left);
    }
  };

  // Pieces BPE may produce; control, unknown and byte pieces are reserved.
  std::optional<int32_t> mergeable(std::string_view piece) const {
    const auto id = vocab_.find(piece);
    if (!id) return std::nullopt;
    const PieceType t = vocab_.types[*id];
    if (t == PieceType::kNormal || t == PieceType::kUserDefined || t == PieceType::kUnused) {
      return id;
    }
    return std::nullopt;
  }

  // The length of the longest frozen piece at text[pos], or 0.
  size_t frozen_at(std::string_view text, size_t pos) const {
    for (const size_t n : frozen_lengths_) {
      if (n <= text.size() - pos && frozen_.count(std::string(text.substr(pos, n))) != 0) return n;
    }
    return 0;
  }

  struct Session {
    const SpmBpe* bpe;
    const std::string& text;
    std::vector<Symbol> symbols;
    std::priority_queue<Pair, std::vector<Pair>, PairAfter> agenda;
    // merged piece -> the two pieces it was made of (symbols change as they merge)
    std::unordered_map<std::string_view, std::pair<std::string_view, std::string_view>> rev_merge;
    bool last_unknown;  // the last piece output was unknown

    std::string_view piece(const Symbol& s) const {
      return std::string_view(text).substr(s.start, s.len);
    }

    void run(std::vector<int32_t>& out) {
      split_characters();
      for (size_t i = 1; i < symbols.size(); ++i) {
        add_pair(static_cast<int32_t>(i - 1), static_cast<int32_t>(i));
      }
      while (!agenda.empty()) {
        const Pair top = agenda.top();
        agenda.pop();
        Symbol& left = symbols[top.left];
        Symbol& right = symbols[top.right];
        if (left.len == 0 || right.len == 0 || left.len + right.len != top.size) continue;
        left.len += right.len;
        right.len = 0;
        left.next = right.next;
        if (right.next >= 0) symbols[right.next].prev = top.left;
        add_pair(left.prev, top.left);
        add_pair(top.left, left.next);
      }
      for (int32_t i = symbols.empty() ? -1 : 0; i != -1; i = symbols[i].next) {
        resegment(piece(symbols[i]), out);
      }
    }

    void split_characters() {
      for (size_t pos = 0; pos < text.size();) {
        size_t n = bpe->frozen_lengths_.empty() ? 0 : bpe->frozen_at(text, pos);
        const bool frozen = n != 0;
        if (!frozen) {
          char32_t cp;
          n = detail::utf8_decode(text, pos, &cp);
        }
        const auto index = static_cast<int32_t>(symbols.size());
        symbols.push_back({index - 1, pos + n < text.size() ? index + 1 : -1, pos, n, frozen});
        pos += n;
      }
    }

    void add_pair(int32_t left, int32_t right) {
      if (left < 0 || right < 0) return;
      const Symbol& l = symbols[left];
      if (l.frozen || symbols[right].frozen) return;
      const std::string_view merged =
          std::string_view(text).substr(l.start, l.len + symbols[right].len);
      const auto id = bpe->mergeable(merged);
      if (!id) return;
      agenda.push({bpe->scores_[*id], left, right, merged.size()});
      // Unused pieces may be formed on the way but are split back afterwards.
      if (bpe->vocab_.types[*id] == PieceType::kUnused) {
        rev_merge[merged] = {piece(l), piece(symbols[right])};
      }
    }

    void resegment(std::string_view w, std::vector<int32_t>& out) {
      const auto id = bpe->vocab_.find(w);
      if (id && bpe->vocab_.types[*id] == PieceType::kUnused) {
        const auto it = rev_merge.find(w);
        if (it != rev_merge.end()) {
          resegment(it->second.first, out);
          resegment(it->second.second, out);
          return;
        }
      }
      if (id && bpe->vocab_.types[*id] != PieceType::kUnknown) {
        out.push_back(*id);
        last_unknown = false;
        return;
      }
      bpe->emit_unknown(w, out, last_unknown);
      last_unknown = true;
    }
  };

  void emit_unknown(std::string_view w, std::vector<int32_t>& out, bool after_unknown) const {
    if (byte_fallback_) {
      const bool all = std::all_of(w.begin(), w.end(), [this](char b) {
        return byte_ids_[static_cast<unsigned char>(b)] >= 0;
      });
      if (all) {
        for (const char b : w) out.push_back(byte_ids_[static_cast<unsigned char>(b)]);
        return;
      }
    }
    if (fuse_unknown_ && after_unknown) return;
    if (unk_id_) out.push_back(*unk_id_);
  }

  const SpmVocab& vocab_;
  const std::vector<float>& scores_;
  std::optional<int32_t> unk_id_;
  bool fuse_unknown_;
  std::array<int32_t, 256> byte_ids_{};
  bool byte_fallback_ = false;
  std::unordered_set<std::string> frozen_;
  std::vector<size_t> frozen_lengths_;  // the lengths of the frozen pieces, longest first
};

class SpmVocabTokenizer final : public SpmTokenizerBase {
 public:
  SpmVocabTokenizer(SpmVocab vocab, std::vector<float> scores, SpecialConfig config,
                    const SpmOptions& options)
      : SpmTokenizerBase(std::move(vocab), config),
        scores_(std::move(scores)),
        remove_extra_whitespaces_(options.remove_extra_whitespaces),
        bpe_(this->vocab(), scores_, options.unknown_id ? options.unknown_id : config.unk,
             options) {}

 protected:
  void encode_text(std::string_view text, std::vector<int32_t>& out) const override {
    bpe_.encode(normalize(text), out);
  }

 private:
  // SentencePiece's normalizer (normalizer.cc) without a character map, as llama.cpp's
  // llm_tokenizer_spm too: spaces become "▁", and the dummy prefix "▁" comes first. With
  // remove_extra_whitespaces, leading spaces are dropped, runs of spaces become one "▁", and
  // trailing "▁" are dropped.
  std::string normalize(std::string_view text) const {
    std::string out;
    size_t i = 0;
    if (remove_extra_whitespaces_) {
      while (i < text.size() && text[i] == ' ') ++i;
    }
    if (i == text.size()) return out;
    out.reserve(text.size() + 16);
    if (config().add_dummy_prefix) out += kSpace;
    bool after_space = remove_extra_whitespaces_;
    for (; i < text.size(); ++i) {
      if (text[i] != ' ') {
        out += text[i];
        after_space = false;
      } else if (!after_space) {
        out += kSpace;
        after_space = remove_extra_whitespaces_;
      }
    }
    if (remove_extra_whitespaces_) {
      const size_t n = std::strlen(kSpace);
      while (out.size() >= n && out.compare(out.size() - n, n, kSpace) == 0)
        out.resize(out.size() - n);
    }
    return out;
  }

  std::vector<float> scores_;
  bool remove_extra_whitespaces_;
  SpmBpe bpe_;
};

[[noreturn]] void vocab_error(const std::string& key, const std::string& message) {
  throw TokenizerError("GGUF vocab: " + key + ": " + message);
}

std::optional<int32_t> checked_id(const std::optional<int32_t>& id, size_t n, const char* key) {
  if (id && (*id < 0 || static_cast<size_t>(*id) >= n)) {
    vocab_error(key,
                "id " + std::to_string(*id) + " is not below the " + std::to_string(n) + " tokens");
  }
  return id;
}

// The tokenizer of a SentencePiece BPE vocabulary. `config_file`, when not empty, is the
// tokenizer file whose directory may hold a tokenizer_config.json.
std::unique_ptr<Tokenizer> spm_from_vocab(const VocabSpec& spec, const SpmOptions& options,
                                          const std::string& config_file) {
  const size_t n = spec.tokens.size();
  if (n == 0) vocab_error("tokenizer.ggml.tokens", "empty");
  if (spec.scores.size() != n) {
    vocab_error("tokenizer.ggml.scores", std::to_string(spec.scores.size()) + " scores for " +
                                             std::to_string(n) + " tokens");
  }
  if (!spec.token_types.empty() && spec.token_types.size() != n) {
    vocab_error("tokenizer.ggml.token_type", std::to_string(spec.token_types.size()) +
                                                 " entries for " + std::to_string(n) + " tokens");
  }
  SpmVocab vocab;
  vocab.pieces = spec.tokens;
  for (size_t i = 0; i < n; ++i) {
    const int32_t t = spec.token_types.empty() ? 1 : spec.token_types[i];
    if (t < 1 || t > 6) {
      vocab_error("tokenizer.ggml.token_type[" + std::to_string(i) + "]",
                  "unknown type " + std::to_string(t));
    }
    vocab.types.push_back(static_cast<PieceType>(t));
  }
  vocab.index();

  SpecialConfig config;
  config.bos = checked_id(spec.bos_id, n, "tokenizer.ggml.bos_token_id");
  config.eos = checked_id(spec.eos_id, n, "tokenizer.ggml.eos_token_id");
  config.pad = checked_id(spec.pad_id, n, "tokenizer.ggml.padding_token_id");
  config.unk = checked_id(spec.unk_id, n, "tokenizer.ggml.unknown_token_id");
  if (!config.unk && !options.unknown_id) {
    const auto it = std::find(vocab.types.begin(), vocab.types.end(), PieceType::kUnknown);
    if (it != vocab.types.end()) config.unk = static_cast<int32_t>(it - vocab.types.begin());
  }
  config.add_bos = spec.add_bos;
  config.add_eos = spec.add_eos;
  config.add_dummy_prefix = spec.add_space_prefix;
  if (!config_file.empty()) apply_tokenizer_config(config_file, vocab, config);
  return std::make_unique<SpmVocabTokenizer>(std::move(vocab), spec.scores, config, options);
}

// ---------------------------------------------------------------------------------------------
// tokenizer.model

// protobuf refuses messages of 2 GiB and more; real SentencePiece models are a few MB.
constexpr size_t kMaxModelBytes = size_t{1} << 30;

std::string read_file(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) {
    throw TokenizerError(path + ": cannot open: " + std::strerror(errno));
  }
  if (S_ISDIR(st.st_mode)) throw TokenizerError(path + ": cannot open: is a directory");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw TokenizerError(path + ": cannot open: " + std::strerror(errno));
  std::string data;
  char chunk[1 << 16];
  while (in) {
    in.read(chunk, sizeof chunk);
    data.append(chunk, static_cast<size_t>(in.gcount()));
    if (data.size() > kMaxModelBytes) {
      throw TokenizerError(path + ": not a SentencePiece model: larger than 1 GiB");
    }
  }
  if (in.bad()) throw TokenizerError(path + ": read failed");
  return data;
}

const char* model_type_name(int32_t type) {
  switch (type) {
    case detail::SpmModelProto::kUnigram:
      return "UNIGRAM";
    case detail::SpmModelProto::kBpe:
      return "BPE";
    case detail::SpmModelProto::kWord:
      return "WORD";
    case detail::SpmModelProto::kChar:
      return "CHAR";
    default:
      return nullptr;
  }
}

[[noreturn]] void model_error(const std::string& path, const std::string& what) {
  throw TokenizerError(path + ": " + what);
}

// Checks that the model is one this implementation encodes exactly as libsentencepiece does,
// and that libsentencepiece would load it (model_interface.cc's InitializePieces). Returns the
// index of every piece.
std::unordered_map<std::string, int32_t> check_model(const detail::SpmModelProto& m,
                                                     const std::string& path) {
  using Proto = detail::SpmModelProto;
  // A file cut short where a message ends parses; what it lacks then tells.
  if (m.pieces.empty()) model_error(path, "not a SentencePiece model: no pieces");
  if (!m.has_trainer_spec)
    model_error(path, "not a SentencePiece model: no trainer_spec (a truncated file?)");
  if (!m.has_normalizer_spec) {
    model_error(path, "not a SentencePiece model: no normalizer_spec (a truncated file?)");
  }
  if (m.model_type != Proto::kBpe) {
    const char* name = model_type_name(m.model_type);
    model_error(path,
                "trainer_spec.model_type: " +
                    (name ? std::string(name) : "unknown type " + std::to_string(m.model_type)) +
                    " models are not supported, only BPE models (as Llama 2 and Mistral use)");
  }
  if (!m.precompiled_charsmap.empty()) {
    model_error(
        path,
        "normalizer_spec: the normalization rule \"" + m.normalizer_name + "\" (a " +
            std::to_string(m.precompiled_charsmap.size()) +
            "-byte precompiled_charsmap) is not supported, only \"identity\" (no normalization, as "
            "Llama 2 and Mistral use)");
  }
  if (!m.escape_whitespaces) {
    model_error(
        path,
        "normalizer_spec.escape_whitespaces: false is not supported (spaces must become \"▁\")");
  }
  if (m.treat_whitespace_as_suffix) {
    model_error(path, "trainer_spec.treat_whitespace_as_suffix: true is not supported");
  }
  if (m.pieces.size() > static_cast<size_t>(INT32_MAX))
    model_error(path, "pieces: too many pieces");

  std::unordered_map<std::string, int32_t> ids;
  ids.reserve(m.pieces.size());
  std::array<bool, 256> bytes{};
  std::optional<size_t> unknown;
  for (size_t i = 0; i < m.pieces.size(); ++i) {
    const Proto::Piece& p = m.pieces[i];
    const std::string where = "pieces[" + std::to_string(i) + "]";
    const std::string named = where + " \"" + p.piece + "\"";
    if (p.piece.empty()) model_error(path, where + ": empty piece");
    if (p.type < Proto::kNormal || p.type > Proto::kByte) {
      model_error(path, named + ": unknown type " + std::to_string(p.type));
    }
    if (std::isnan(p.score)) model_error(path, named + ": the score is NaN");
    const auto [it, inserted] = ids.emplace(p.piece, static_cast<int32_t>(i));
    if (!inserted)
      model_error(path, named + ": the same piece as pieces[" + std::to_string(it->second) + "]");
    if (p.type == Proto::kUnknown) {
      if (unknown)
        model_error(path,
                    named + ": a second unknown piece (pieces[" + std::to_string(*unknown) + "])");
      unknown = i;
    }
    if (p.type == Proto::kByte) {
      if (!m.byte_fallback)
        model_error(path, named + ": a byte piece, but trainer_spec.byte_fallback is false");
      int b = -1;
      for (int v = 0; v < 256 && b < 0; ++v) {
        if (p.piece == byte_piece(static_cast<unsigned char>(v))) b = v;
      }
      if (b < 0) model_error(path, named + ": a byte piece not named <0xXX>");
      bytes[static_cast<size_t>(b)] = true;
    }
  }
  if (!unknown) model_error(path, "pieces: no unknown piece (type UNKNOWN)");
  if (m.byte_fallback && std::find(bytes.begin(), bytes.end(), false) != bytes.end()) {
    model_error(
        path,
        "trainer_spec.byte_fallback is true, but the 256 byte pieces <0x00>..<0xFF> are not all "
        "there");
  }
  return ids;
}

// The vocabulary of a checked model and the options libsentencepiece runs it with.
std::pair<VocabSpec, SpmOptions> read_model(const std::string& model_path) {
  using Proto = detail::SpmModelProto;
  const Proto proto = detail::parse_spm_model_proto(read_file(model_path), model_path);
  const std::unordered_map<std::string, int32_t> ids = check_model(proto, model_path);

  VocabSpec spec;
  spec.model = "llama";
  const size_t n = proto.pieces.size();
  spec.tokens.reserve(n);
  spec.scores.reserve(n);
  spec.token_types.reserve(n);
  std::optional<int32_t> unknown;
  for (size_t i = 0; i < n; ++i) {
    spec.tokens.push_back(proto.pieces[i].piece);
    spec.scores.push_back(proto.pieces[i].score);
    spec.token_types.push_back(proto.pieces[i].type);
    if (proto.pieces[i].type == Proto::kUnknown) unknown = static_cast<int32_t>(i);
  }
  // libsentencepiece's unk_id(), bos_id(), ...: the piece trainer_spec names (an empty name
  // means the default), when it has the expected type.
  auto named = [&](const std::string& name, const char* default_name,
                   int32_t type) -> std::optional<int32_t> {
    const auto it = ids.find(name.empty() ? std::string(default_name) : name);
    if (it == ids.end() || proto.pieces[it->second].type != type) return std::nullopt;
    return it->second;
  };
  spec.unk_id = named(proto.unk_piece, "<unk>", Proto::kUnknown);
  spec.bos_id = named(proto.bos_piece, "<s>", Proto::kControl);
  spec.eos_id = named(proto.eos_piece, "</s>", Proto::kControl);
  spec.pad_id = named(proto.pad_piece, "<pad>", Proto::kControl);
  spec.add_bos = true;  // Llama 2 and Mistral start with <s>; tokenizer_config.json may say not
  spec.add_eos = false;
  spec.add_space_prefix = proto.add_dummy_prefix;

  SpmOptions options;
  options.remove_extra_whitespaces = proto.remove_extra_whitespaces;
  options.fuse_unknown = true;
  options.freeze_user_defined = true;
  options.unknown_id = unknown;
  return {std::move(spec), options};
}

}  // namespace

std::unique_ptr<Tokenizer> load_sentencepiece(const std::string& model_path) {
  auto [spec, options] = read_model(model_path);
  return spm_from_vocab(spec, options, model_path);
}

VocabSpec sentencepiece_vocab(const std::string& model_path) {
  VocabSpec spec = read_model(model_path).first;
  const std::optional<detail::TokenizerConfig> config = detail::read_tokenizer_config(model_path);
  if (config && config->add_bos) spec.add_bos = *config->add_bos;
  if (config && config->add_eos) spec.add_eos = *config->add_eos;
  return spec;
}

namespace detail {

std::unique_ptr<Tokenizer> sentencepiece_from_vocab(const VocabSpec& spec) {
  return spm_from_vocab(spec, SpmOptions{}, std::string());
}

}  // namespace detail
}  // namespace qlora::tokenizers
