// SentencePiece .model files without libsentencepiece: a .model file is a serialized
// sentencepiece.ModelProto (sentencepiece_model.proto, proto2). This reads the fields that
// encoding depends on with a small, strict protobuf wire-format reader.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace qlora::tokenizers::detail {

// sentencepiece.ModelProto, reduced to what encoding depends on. Fields absent from the file
// keep their proto2 defaults; a field given twice keeps its last value, and the sub-messages
// given twice are merged, as protobuf does. Everything else (self_test_data,
// denormalizer_spec, the training parameters) is skipped.
struct SpmModelProto {
  // ModelProto.SentencePiece.Type (the values of GgufTokenType).
  enum PieceType : int32_t {
    kNormal = 1,
    kUnknown = 2,
    kControl = 3,
    kUserDefined = 4,
    kUnused = 5,
    kByte = 6
  };
  // TrainerSpec.ModelType.
  enum ModelType : int32_t { kUnigram = 1, kBpe = 2, kWord = 3, kChar = 4 };

  struct Piece {
    std::string piece;       // 1
    float score = 0.0f;      // 2
    int32_t type = kNormal;  // 3, not checked against PieceType here
  };
  std::vector<Piece> pieces;  // ModelProto.pieces = 1

  // Whether the file holds a trainer_spec / normalizer_spec (the trainer always writes both).
  bool has_trainer_spec = false;
  bool has_normalizer_spec = false;

  // ModelProto.trainer_spec = 2. libsentencepiece finds the unk/bos/eos/pad ids by these
  // piece names (an empty name means the default), not by the unk_id..pad_id fields (40-43).
  int32_t model_type = kUnigram;            // 3
  bool treat_whitespace_as_suffix = false;  // 24
  bool byte_fallback = false;               // 35
  std::string unk_piece = "<unk>";          // 45
  std::string bos_piece = "<s>";            // 46
  std::string eos_piece = "</s>";           // 47
  std::string pad_piece = "<pad>";          // 48

  // ModelProto.normalizer_spec = 3.
  std::string normalizer_name;           // 1
  std::string precompiled_charsmap;      // 2
  bool add_dummy_prefix = true;          // 3
  bool remove_extra_whitespaces = true;  // 4
  bool escape_whitespaces = true;        // 5
};

// Parses `data`, the bytes of the file `source`. Unknown fields are skipped, whatever their
// wire type (varint, 64-bit, length-delimited or 32-bit). Malformed input (a truncated or
// overlong varint, a length that runs past the end of its message, a group or an invalid
// wire type, a known field with the wrong wire type) throws TokenizerError:
//   "SOURCE: not a SentencePiece model: byte OFFSET: FIELD: PROBLEM".
// Whether the model is one qlora can run is not checked here.
SpmModelProto parse_spm_model_proto(std::string_view data, const std::string& source);

}  // namespace qlora::tokenizers::detail
