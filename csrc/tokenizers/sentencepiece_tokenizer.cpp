// SentencePiece tokenizers (Llama 2, Mistral): a tokenizer.model run by libsentencepiece, and
// the same vocabulary as a GGUF file stores it (tokenizer.ggml.model "llama"), run by the
// SentencePiece BPE algorithm implemented here so that no .model file is needed.
//
// Both behave as Hugging Face's converted Llama tokenizers (legacy mode) and llama.cpp do:
// control, unknown and user-defined pieces written in the text are matched first, and each
// stretch of text between them is encoded separately with its own "▁" dummy prefix.
// Decoding is Hugging Face's: "▁" -> " ", <0xXX> pieces -> bytes, one leading space dropped.
#include <sentencepiece_processor.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <queue>
#include <sstream>
#include <unordered_map>
#include <utility>

#include "tokenizers/tokenizer_internal.h"

namespace qlora::tokenizers {
namespace {

using detail::AddedToken;
using detail::AddedVocabulary;
using detail::Segment;

const char* const kSpace = "\xE2\x96\x81";  // U+2581, SentencePiece's whitespace marker

using PieceType = GgufTokenType;  // SentencePiece's ModelProto types have the same values

std::string replace_spaces(std::string_view text) {
  std::string out;
  out.reserve(text.size() + 8);
  for (const char c : text) {
    if (c == ' ') {
      out += kSpace;
    } else {
      out += c;
    }
  }
  return out;
}

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

// ---------------------------------------------------------------------------------------------
// tokenizer.model through libsentencepiece

// Just enough of the protobuf wire format to read what libsentencepiece's API does not
// expose: each piece's type (user-defined pieces) and normalizer_spec.add_dummy_prefix.
class ProtoReader {
 public:
  explicit ProtoReader(std::string_view data) : data_(data) {}

  bool done() const { return pos_ >= data_.size(); }

  // Reads the next field's key; false on malformed input.
  bool next(uint32_t* field, uint32_t* wire_type) {
    uint64_t key;
    if (!varint(&key)) return false;
    *field = static_cast<uint32_t>(key >> 3);
    *wire_type = static_cast<uint32_t>(key & 7);
    return true;
  }

  bool varint(uint64_t* value) {
    *value = 0;
    for (int shift = 0; shift < 64 && pos_ < data_.size(); shift += 7) {
      const auto b = static_cast<unsigned char>(data_[pos_++]);
      *value |= static_cast<uint64_t>(b & 0x7F) << shift;
      if ((b & 0x80) == 0) return true;
    }
    return false;
  }

  bool bytes(std::string_view* out) {
    uint64_t n;
    if (!varint(&n) || n > data_.size() - pos_) return false;
    *out = data_.substr(pos_, n);
    pos_ += n;
    return true;
  }

  bool skip(uint32_t wire_type) {
    uint64_t v;
    std::string_view s;
    switch (wire_type) {
      case 0:
        return varint(&v);
      case 1:
        return advance(8);
      case 2:
        return bytes(&s);
      case 5:
        return advance(4);
      default:
        return false;
    }
  }

 private:
  bool advance(size_t n) {
    if (n > data_.size() - pos_) return false;
    pos_ += n;
    return true;
  }

  std::string_view data_;
  size_t pos_ = 0;
};

struct ModelProtoInfo {
  std::vector<PieceType> types;
  bool add_dummy_prefix = true;
};

// ModelProto: 1 = repeated SentencePiece {1 piece, 2 score, 3 type}, 3 = NormalizerSpec
// {3 add_dummy_prefix}.
bool read_piece_type(std::string_view message, PieceType* type) {
  ProtoReader r(message);
  *type = PieceType::kNormal;
  uint32_t field, wire;
  while (!r.done()) {
    if (!r.next(&field, &wire)) return false;
    uint64_t v;
    if (field == 3 && wire == 0) {
      if (!r.varint(&v)) return false;
      *type = static_cast<PieceType>(v);
    } else if (!r.skip(wire)) {
      return false;
    }
  }
  return true;
}

bool read_add_dummy_prefix(std::string_view message, bool* add_dummy_prefix) {
  ProtoReader r(message);
  uint32_t field, wire;
  while (!r.done()) {
    if (!r.next(&field, &wire)) return false;
    uint64_t v;
    if (field == 3 && wire == 0) {
      if (!r.varint(&v)) return false;
      *add_dummy_prefix = v != 0;
    } else if (!r.skip(wire)) {
      return false;
    }
  }
  return true;
}

std::optional<ModelProtoInfo> read_model_proto(std::string_view data) {
  ModelProtoInfo info;
  ProtoReader r(data);
  uint32_t field, wire;
  while (!r.done()) {
    if (!r.next(&field, &wire)) return std::nullopt;
    std::string_view message;
    if ((field == 1 || field == 3) && wire == 2) {
      if (!r.bytes(&message)) return std::nullopt;
      if (field == 1) {
        PieceType type;
        if (!read_piece_type(message, &type)) return std::nullopt;
        info.types.push_back(type);
      } else if (!read_add_dummy_prefix(message, &info.add_dummy_prefix)) {
        return std::nullopt;
      }
    } else if (!r.skip(wire)) {
      return std::nullopt;
    }
  }
  return info;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw TokenizerError(path + ": cannot open: " + std::strerror(errno));
  std::ostringstream data;
  data << in.rdbuf();
  if (in.bad()) throw TokenizerError(path + ": read failed");
  return data.str();
}

std::optional<int32_t> valid_id(int id) {
  if (id < 0) return std::nullopt;
  return id;
}

class SentencePieceModelTokenizer final : public SpmTokenizerBase {
 public:
  SentencePieceModelTokenizer(std::unique_ptr<sentencepiece::SentencePieceProcessor> processor,
                              SpmVocab vocab, SpecialConfig config)
      : SpmTokenizerBase(std::move(vocab), config), processor_(std::move(processor)) {}

 protected:
  void encode_text(std::string_view text, std::vector<int32_t>& out) const override {
    std::vector<int> ids;
    const auto status = processor_->Encode(absl::string_view(text.data(), text.size()), &ids);
    if (!status.ok()) throw std::runtime_error("sentencepiece: " + status.ToString());
    out.insert(out.end(), ids.begin(), ids.end());
  }

 private:
  std::unique_ptr<sentencepiece::SentencePieceProcessor> processor_;
};

// ---------------------------------------------------------------------------------------------
// SentencePiece BPE on a GGUF vocabulary (bpe_model.cc's Encode, with its resegmentation of
// unused pieces and SentencePieceProcessor's byte fallback)

class SpmBpe {
 public:
  SpmBpe(const SpmVocab& vocab, const std::vector<float>& scores, std::optional<int32_t> unk_id)
      : vocab_(vocab), scores_(scores), unk_id_(unk_id) {
    bool any_byte = false;
    byte_ids_.fill(-1);
    for (int b = 0; b < 256; ++b) {
      if (const auto id = vocab.find(byte_piece(static_cast<unsigned char>(b)))) {
        if (vocab.types[*id] == PieceType::kByte) byte_ids_[b] = *id, any_byte = true;
      }
    }
    byte_fallback_ = any_byte;
  }

  void encode(const std::string& text, std::vector<int32_t>& out) const {
    Session session{this, text, {}, {}, {}};
    session.run(out);
  }

 private:
  struct Symbol {
    int32_t prev, next;
    size_t start, len;  // len 0 once merged into its left neighbour
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

  struct Session {
    const SpmBpe* bpe;
    const std::string& text;
    std::vector<Symbol> symbols;
    std::priority_queue<Pair, std::vector<Pair>, PairAfter> agenda;
    // merged piece -> the two pieces it was made of (symbols change as they merge)
    std::unordered_map<std::string_view, std::pair<std::string_view, std::string_view>> rev_merge;

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
        char32_t cp;
        const size_t n = detail::utf8_decode(text, pos, &cp);
        const auto index = static_cast<int32_t>(symbols.size());
        symbols.push_back({index - 1, pos + n < text.size() ? index + 1 : -1, pos, n});
        pos += n;
      }
    }

    void add_pair(int32_t left, int32_t right) {
      if (left < 0 || right < 0) return;
      const Symbol& l = symbols[left];
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

    void resegment(std::string_view w, std::vector<int32_t>& out) const {
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
        return;
      }
      bpe->emit_unknown(w, out);
    }
  };

  void emit_unknown(std::string_view w, std::vector<int32_t>& out) const {
    if (byte_fallback_) {
      const bool all = std::all_of(w.begin(), w.end(), [this](char b) {
        return byte_ids_[static_cast<unsigned char>(b)] >= 0;
      });
      if (all) {
        for (const char b : w) out.push_back(byte_ids_[static_cast<unsigned char>(b)]);
        return;
      }
    }
    if (unk_id_) out.push_back(*unk_id_);
  }

  const SpmVocab& vocab_;
  const std::vector<float>& scores_;
  std::optional<int32_t> unk_id_;
  std::array<int32_t, 256> byte_ids_{};
  bool byte_fallback_ = false;
};

class SpmVocabTokenizer final : public SpmTokenizerBase {
 public:
  SpmVocabTokenizer(SpmVocab vocab, std::vector<float> scores, SpecialConfig config)
      : SpmTokenizerBase(std::move(vocab), config),
        scores_(std::move(scores)),
        bpe_(this->vocab(), scores_, config.unk) {}

 protected:
  // llama.cpp's llm_tokenizer_spm: a leading space (the dummy prefix), spaces as "▁".
  void encode_text(std::string_view text, std::vector<int32_t>& out) const override {
    std::string escaped = replace_spaces(text);
    if (config().add_dummy_prefix) escaped.insert(0, kSpace);
    bpe_.encode(escaped, out);
  }

 private:
  std::vector<float> scores_;
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

}  // namespace

std::unique_ptr<Tokenizer> load_sentencepiece(const std::string& model_path) {
  const std::string data = read_file(model_path);
  auto processor = std::make_unique<sentencepiece::SentencePieceProcessor>();
  const auto status =
      processor->LoadFromSerializedProto(absl::string_view(data.data(), data.size()));
  if (!status.ok()) {
    throw TokenizerError(model_path + ": not a SentencePiece model: " + status.ToString());
  }
  const std::optional<ModelProtoInfo> info = read_model_proto(data);
  const auto n = static_cast<size_t>(processor->GetPieceSize());
  if (!info || info->types.size() != n) {
    throw TokenizerError(model_path + ": pieces: cannot read the piece types");
  }
  SpmVocab vocab;
  for (size_t i = 0; i < n; ++i) vocab.pieces.push_back(processor->IdToPiece(static_cast<int>(i)));
  vocab.types = info->types;
  vocab.index();

  SpecialConfig config;
  config.bos = valid_id(processor->bos_id());
  config.eos = valid_id(processor->eos_id());
  config.pad = valid_id(processor->pad_id());
  config.unk = valid_id(processor->unk_id());
  config.add_dummy_prefix = info->add_dummy_prefix;
  apply_tokenizer_config(model_path, vocab, config);
  return std::make_unique<SentencePieceModelTokenizer>(std::move(processor), std::move(vocab),
                                                       config);
}

namespace detail {

std::unique_ptr<Tokenizer> sentencepiece_from_vocab(const VocabSpec& spec) {
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
  if (!config.unk) {
    const auto it = std::find(vocab.types.begin(), vocab.types.end(), PieceType::kUnknown);
    if (it != vocab.types.end()) config.unk = static_cast<int32_t>(it - vocab.types.begin());
  }
  config.add_bos = spec.add_bos;
  config.add_eos = spec.add_eos;
  config.add_dummy_prefix = spec.add_space_prefix;
  return std::make_unique<SpmVocabTokenizer>(std::move(vocab), spec.scores, config);
}

}  // namespace detail
}  // namespace qlora::tokenizers
