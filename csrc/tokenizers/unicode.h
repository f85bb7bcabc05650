// Unicode as Hugging Face tokenizers sees it: UTF-8 decoding and repair, White_Space, the
// NFC / NFD normalizers with tokenizers' tables, and GPT-2's byte-level alphabet. Shared by
// the byte-level BPE and the SentencePiece tokenizers.
#pragma once

#include <cstddef>
#include <optional>
#include <string>
#include <string_view>

namespace qlora::tokenizers::detail {

// Decodes the code point at s[i] of valid UTF-8 and returns its byte length.
size_t utf8_decode(std::string_view s, size_t i, char32_t* cp);
void utf8_append(std::string& out, char32_t cp);
// Each maximal invalid subsequence becomes U+FFFD, as Rust's String::from_utf8_lossy and
// Python's bytes.decode(errors="replace") do; valid input is returned unchanged.
std::string utf8_lossy(std::string_view bytes);
bool utf8_valid(std::string_view bytes);
// Byte length of the code point at s[i] of valid UTF-8.
size_t utf8_length_at(std::string_view s, size_t i);
// Start of the code point that ends at s[end).
size_t utf8_previous(std::string_view s, size_t end);

// Unicode White_Space, what Rust's char::is_whitespace and regex \s match.
bool is_white_space(char32_t cp);

// Canonical composition / decomposition with the tables tokenizers' normalizers use.
std::string nfc(std::string_view s);
std::string nfd(std::string_view s);

// GPT-2's bytes_to_unicode: every byte as a printable character, and back. alphabet_to_bytes
// gives nothing when a character lies outside the alphabet (an added token).
std::string bytes_to_alphabet(std::string_view bytes);
std::optional<std::string> alphabet_to_bytes(std::string_view token);

}  // namespace qlora::tokenizers::detail
