// The decoders of a tokenizer.json (see decoders.h).
#include "tokenizers/decoders.h"

#include <optional>

#include "tokenizers/pre_tokenizers.h"
#include "tokenizers/regex.h"
#include "tokenizers/unicode.h"
#include "util/strings.h"

namespace qlora::tokenizers::detail {

TokenDecoder::Tokens decode_byte_level(TokenDecoder::Tokens tokens) {
  std::string bytes;
  for (const std::string& token : tokens) {
    // A token with characters outside the alphabet (an added token) is kept as written.
    const std::optional<std::string> b = alphabet_to_bytes(token);
    bytes += b ? *b : token;
  }
  return {detail::utf8_lossy(bytes)};
}

namespace {

using util::starts_with;

int hex_digit(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// "<0xAB>" as ByteFallback reads it (u8::from_str_radix, which also takes "+A").
std::optional<unsigned char> byte_token_value(const std::string& token) {
  if (token.size() != 6 || !starts_with(token, "<0x") || token[5] != '>') return std::nullopt;
  const int hi = hex_digit(token[3]), lo = hex_digit(token[4]);
  if (token[3] == '+' && lo >= 0) return static_cast<unsigned char>(lo);
  if (hi < 0 || lo < 0) return std::nullopt;
  return static_cast<unsigned char>(hi * 16 + lo);
}

TokenDecoder::Tokens decode_byte_fallback(TokenDecoder::Tokens tokens) {
  TokenDecoder::Tokens out;
  std::string pending;  // bytes of consecutive <0xXX> tokens
  auto flush = [&]() {
    if (pending.empty()) return;
    if (detail::utf8_valid(pending)) {
      out.push_back(pending);
    } else {
      // Invalid bytes become one U+FFFD each, not one per invalid sequence.
      for (size_t i = 0; i < pending.size(); ++i) out.emplace_back("\xEF\xBF\xBD");
    }
    pending.clear();
  };
  for (std::string& token : tokens) {
    if (const auto b = byte_token_value(token)) {
      pending += static_cast<char>(*b);
    } else {
      flush();
      out.push_back(std::move(token));
    }
  }
  flush();
  return out;
}

TokenDecoder::Step strip_step(std::string content, size_t start, size_t stop) {
  return [content, start, stop](TokenDecoder::Tokens tokens) {
    for (std::string& token : tokens) {
      size_t begin = 0, end = token.size();
      for (size_t i = 0; i < start && starts_with(token.substr(begin), content); ++i) {
        begin += content.size();
      }
      for (size_t i = 0; i < stop && end >= begin + content.size() &&
                         token.compare(end - content.size(), content.size(), content) == 0;
           ++i) {
        end -= content.size();
      }
      token = token.substr(begin, end - begin);
    }
    return tokens;
  };
}

TokenDecoder::Step metaspace_decode_step(std::string replacement, PrependScheme scheme) {
  return [replacement, scheme](TokenDecoder::Tokens tokens) {
    for (size_t i = 0; i < tokens.size(); ++i) {
      // In the first token every replacement goes, not only the prepended one.
      const bool drop = i == 0 && scheme != PrependScheme::kNever;
      tokens[i] = replace_all(tokens[i], replacement, drop ? "" : " ");
    }
    return tokens;
  };
}

}  // namespace

void parse_decoder(const JsonNode& node, TokenDecoder& out) {
  const std::string type = node.type();
  out.mark_present();
  if (type == "Sequence") {
    const JsonNode list = node.at("decoders");
    for (size_t i = 0; i < list.size(); ++i) parse_decoder(list[i], out);
  } else if (type == "ByteLevel") {
    out.add(decode_byte_level);
  } else if (type == "ByteFallback") {
    out.add(decode_byte_fallback);
  } else if (type == "Fuse") {
    out.add([](TokenDecoder::Tokens tokens) {
      std::string all;
      for (const std::string& t : tokens) all += t;
      return TokenDecoder::Tokens{all};
    });
  } else if (type == "Replace") {
    out.add([pattern = parse_pattern(node.at("pattern")),
             content = node.at("content").str()](TokenDecoder::Tokens tokens) {
      for (std::string& t : tokens) t = pattern.replace_all(t, content);
      return tokens;
    });
  } else if (type == "Strip") {
    const auto count = [&node](const char* key) {
      const int64_t v = node.at(key).integer();
      if (v < 0) node.at(key).fail("expected a non-negative integer");
      return static_cast<size_t>(v);
    };
    out.add(strip_step(single_char(node.at("content")), count("start"), count("stop")));
  } else if (type == "Metaspace") {
    out.add(metaspace_decode_step(single_char(node.at("replacement")), parse_prepend_scheme(node)));
  } else {
    node.at("type").fail("decoder \"" + type +
                         "\" is not supported (ByteLevel, ByteFallback, Fuse, Replace, Strip, "
                         "Metaspace, Sequence)");
  }
}

}  // namespace qlora::tokenizers::detail
