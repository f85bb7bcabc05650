// A strict reader of the protobuf wire format (https://protobuf.dev/programming-guides/encoding/)
// for SentencePiece's ModelProto. Every length is checked against the bytes left in its
// message before anything is read or allocated, so a truncated or corrupt file ends in a
// TokenizerError naming the byte, never in a crash or an allocation larger than the file.
#include "tokenizers/spm_model_proto.h"

#include <cstring>
#include <utility>

#include "qlora/tokenizers/tokenizer.h"

namespace qlora::tokenizers::detail {
namespace {

enum WireType : uint32_t {
  kVarint = 0,
  kFixed64 = 1,
  kLengthDelimited = 2,
  kStartGroup = 3,
  kEndGroup = 4,
  kFixed32 = 5,
};

const char* wire_type_name(uint32_t wire_type) {
  switch (wire_type) {
    case kVarint:
      return "varint";
    case kFixed64:
      return "64-bit";
    case kLengthDelimited:
      return "length-delimited";
    case kStartGroup:
      return "start-group";
    case kEndGroup:
      return "end-group";
    case kFixed32:
      return "32-bit";
    default:
      return "invalid";
  }
}

constexpr uint64_t kMaxFieldNumber = (uint64_t{1} << 29) - 1;

struct Field {
  uint32_t number = 0;
  uint32_t wire_type = 0;
  size_t offset = 0;  // of the field's key, in the file
};

// Reads the fields of one message: `data` lies at byte `base` of the file `source`, and
// `where` names the message in errors ("ModelProto", "pieces[3]", ...).
class WireReader {
 public:
  WireReader(std::string_view data, size_t base, const std::string& source, std::string where)
      : data_(data), base_(base), source_(source), where_(std::move(where)) {}

  bool done() const { return pos_ == data_.size(); }

  Field next() {
    Field field;
    field.offset = offset();
    const uint64_t key = varint("");
    field.wire_type = static_cast<uint32_t>(key & 7);
    if (key >> 3 == 0 || key >> 3 > kMaxFieldNumber) {
      fail(field.offset, "", "invalid field number " + std::to_string(key >> 3));
    }
    field.number = static_cast<uint32_t>(key >> 3);
    const std::string name = unknown_name(field);
    if (field.wire_type == kStartGroup || field.wire_type == kEndGroup) {
      fail(field.offset, name, "groups (wire type 3/4) are not supported");
    }
    if (field.wire_type > kFixed32) {
      fail(field.offset, name, "invalid wire type " + std::to_string(field.wire_type));
    }
    return field;
  }

  void skip(const Field& field) {
    const std::string name = unknown_name(field);
    switch (field.wire_type) {
      case kVarint:
        varint(name);
        return;
      case kFixed64:
        fixed(8, name);
        return;
      case kLengthDelimited:
        length_delimited(name);
        return;
      default:  // kFixed32; next() refused the others
        fixed(4, name);
        return;
    }
  }

  // ---- typed reads of a known field: the wire type must be the declared type's ----

  bool boolean(const Field& field, const char* name) {
    expect(field, kVarint, name);
    return varint(std::string(".") + name) != 0;
  }

  // int32 and enum fields: protobuf keeps the low 32 bits of the varint.
  int32_t int32(const Field& field, const char* name) {
    expect(field, kVarint, name);
    return static_cast<int32_t>(static_cast<uint32_t>(varint(std::string(".") + name)));
  }

  float float32(const Field& field, const char* name) {
    expect(field, kFixed32, name);
    const std::string_view b = fixed(4, std::string(".") + name);
    const uint32_t bits = static_cast<uint32_t>(static_cast<unsigned char>(b[0])) |
                          static_cast<uint32_t>(static_cast<unsigned char>(b[1])) << 8 |
                          static_cast<uint32_t>(static_cast<unsigned char>(b[2])) << 16 |
                          static_cast<uint32_t>(static_cast<unsigned char>(b[3])) << 24;
    float value;
    std::memcpy(&value, &bits, sizeof value);
    return value;
  }

  std::string_view bytes(const Field& field, const char* name) {
    expect(field, kLengthDelimited, name);
    return length_delimited(std::string(".") + name);
  }

  WireReader message(const Field& field, const char* name, std::string where) {
    expect(field, kLengthDelimited, name);
    const std::string_view body = length_delimited(std::string(".") + name);
    return WireReader(body, base_ + static_cast<size_t>(body.data() - data_.data()), source_,
                      std::move(where));
  }

 private:
  size_t offset() const { return base_ + pos_; }

  static std::string unknown_name(const Field& field) {
    return " field " + std::to_string(field.number);
  }

  // `name` follows where_: ".score" for a known field, " field 7" for another, or nothing.
  [[noreturn]] void fail(size_t at, const std::string& name, const std::string& what) const {
    throw TokenizerError(source_ + ": not a SentencePiece model: byte " + std::to_string(at) +
                         ": " + where_ + name + ": " + what);
  }

  void expect(const Field& field, uint32_t wire_type, const char* name) const {
    if (field.wire_type != wire_type) {
      fail(field.offset, std::string(".") + name,
           std::string("wire type ") + std::to_string(field.wire_type) + " (" +
               wire_type_name(field.wire_type) + "), expected " + std::to_string(wire_type) + " (" +
               wire_type_name(wire_type) + ")");
    }
  }

  uint64_t varint(const std::string& name) {
    const size_t start = offset();
    uint64_t value = 0;
    for (int i = 0; i < 10; ++i) {
      if (pos_ == data_.size()) fail(start, name, "truncated varint");
      const auto b = static_cast<unsigned char>(data_[pos_++]);
      // The 10th byte holds bit 63 only.
      if (i == 9 && b > 1) fail(start, name, "varint longer than 64 bits");
      value |= static_cast<uint64_t>(b & 0x7F) << (7 * i);
      if ((b & 0x80) == 0) return value;
    }
    fail(start, name, "varint longer than 64 bits");  // not reached: the 10th byte is <= 1
  }

  std::string_view fixed(size_t n, const std::string& name) {
    if (n > data_.size() - pos_) {
      fail(offset(), name,
           "truncated " + std::to_string(8 * n) + "-bit value (" +
               std::to_string(data_.size() - pos_) + " bytes left in the message)");
    }
    const std::string_view out = data_.substr(pos_, n);
    pos_ += n;
    return out;
  }

  std::string_view length_delimited(const std::string& name) {
    const size_t start = offset();
    const uint64_t n = varint(name);
    if (n > data_.size() - pos_) {
      fail(start, name,
           "length " + std::to_string(n) + " runs past the end of the message (" +
               std::to_string(data_.size() - pos_) + " bytes left)");
    }
    const std::string_view out = data_.substr(pos_, static_cast<size_t>(n));
    pos_ += static_cast<size_t>(n);
    return out;
  }

  std::string_view data_;
  size_t base_;
  const std::string& source_;
  std::string where_;
  size_t pos_ = 0;
};

// ModelProto.SentencePiece {1 piece, 2 score, 3 type}.
void read_piece(WireReader r, SpmModelProto::Piece& piece) {
  while (!r.done()) {
    const Field f = r.next();
    switch (f.number) {
      case 1:
        piece.piece = std::string(r.bytes(f, "piece"));
        break;
      case 2:
        piece.score = r.float32(f, "score");
        break;
      case 3:
        piece.type = r.int32(f, "type");
        break;
      default:
        r.skip(f);
    }
  }
}

void read_trainer_spec(WireReader r, SpmModelProto& model) {
  while (!r.done()) {
    const Field f = r.next();
    switch (f.number) {
      case 3:
        model.model_type = r.int32(f, "model_type");
        break;
      case 24:
        model.treat_whitespace_as_suffix = r.boolean(f, "treat_whitespace_as_suffix");
        break;
      case 35:
        model.byte_fallback = r.boolean(f, "byte_fallback");
        break;
      case 45:
        model.unk_piece = std::string(r.bytes(f, "unk_piece"));
        break;
      case 46:
        model.bos_piece = std::string(r.bytes(f, "bos_piece"));
        break;
      case 47:
        model.eos_piece = std::string(r.bytes(f, "eos_piece"));
        break;
      case 48:
        model.pad_piece = std::string(r.bytes(f, "pad_piece"));
        break;
      default:
        r.skip(f);
    }
  }
}

void read_normalizer_spec(WireReader r, SpmModelProto& model) {
  while (!r.done()) {
    const Field f = r.next();
    switch (f.number) {
      case 1:
        model.normalizer_name = std::string(r.bytes(f, "name"));
        break;
      case 2:
        model.precompiled_charsmap = std::string(r.bytes(f, "precompiled_charsmap"));
        break;
      case 3:
        model.add_dummy_prefix = r.boolean(f, "add_dummy_prefix");
        break;
      case 4:
        model.remove_extra_whitespaces = r.boolean(f, "remove_extra_whitespaces");
        break;
      case 5:
        model.escape_whitespaces = r.boolean(f, "escape_whitespaces");
        break;
      default:
        r.skip(f);
    }
  }
}

}  // namespace

SpmModelProto parse_spm_model_proto(std::string_view data, const std::string& source) {
  SpmModelProto model;
  WireReader r(data, 0, source, "ModelProto");
  while (!r.done()) {
    const Field f = r.next();
    switch (f.number) {
      case 1: {
        const std::string where = "pieces[" + std::to_string(model.pieces.size()) + "]";
        // Each piece takes at least two bytes of the file, which bounds the vector.
        read_piece(r.message(f, "pieces", where), model.pieces.emplace_back());
        break;
      }
      case 2:
        read_trainer_spec(r.message(f, "trainer_spec", "trainer_spec"), model);
        model.has_trainer_spec = true;
        break;
      case 3:
        read_normalizer_spec(r.message(f, "normalizer_spec", "normalizer_spec"), model);
        model.has_normalizer_spec = true;
        break;
      default:
        r.skip(f);
    }
  }
  return model;
}

}  // namespace qlora::tokenizers::detail
