// UTF-8, White_Space, NFC / NFD and the byte-level alphabet (see unicode.h).
#include "tokenizers/unicode.h"

#include <algorithm>
#include <array>
#include <cstdint>
#include <iterator>
#include <vector>

#include "tokenizers/unicode_data.h"

namespace qlora::tokenizers::detail {

size_t utf8_decode(std::string_view s, size_t i, char32_t* cp) {
  const auto b0 = static_cast<unsigned char>(s[i]);
  if (b0 < 0x80) {
    *cp = b0;
    return 1;
  }
  const size_t n = b0 >= 0xF0 ? 4 : b0 >= 0xE0 ? 3 : 2;
  char32_t c = b0 & (0x3F >> (n - 1));
  for (size_t k = 1; k < n; ++k) c = (c << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
  *cp = c;
  return n;
}

void utf8_append(std::string& out, char32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

namespace {

// Length of the well-formed sequence at s[i] (Unicode table 3-7), or, when it is not one, of
// its maximal subpart: the bytes one U+FFFD replaces.
size_t sequence_length(std::string_view s, size_t i, bool* valid) {
  const auto b0 = static_cast<unsigned char>(s[i]);
  *valid = true;
  if (b0 < 0x80) return 1;
  size_t trail = 0;
  unsigned char lo = 0x80, hi = 0xBF;  // bounds of the first trailing byte
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    trail = 1;
  } else if (b0 == 0xE0) {
    trail = 2, lo = 0xA0;
  } else if ((b0 >= 0xE1 && b0 <= 0xEC) || b0 == 0xEE || b0 == 0xEF) {
    trail = 2;
  } else if (b0 == 0xED) {
    trail = 2, hi = 0x9F;
  } else if (b0 == 0xF0) {
    trail = 3, lo = 0x90;
  } else if (b0 >= 0xF1 && b0 <= 0xF3) {
    trail = 3;
  } else if (b0 == 0xF4) {
    trail = 3, hi = 0x8F;
  } else {
    *valid = false;
    return 1;
  }
  for (size_t k = 1; k <= trail; ++k) {
    const bool first = k == 1;
    if (i + k >= s.size()) {
      *valid = false;
      return k;
    }
    const auto b = static_cast<unsigned char>(s[i + k]);
    if (b < (first ? lo : 0x80) || b > (first ? hi : 0xBF)) {
      *valid = false;
      return k;
    }
  }
  return trail + 1;
}

}  // namespace

bool utf8_valid(std::string_view bytes) {
  bool valid = true;
  for (size_t i = 0; i < bytes.size() && valid;) i += sequence_length(bytes, i, &valid);
  return valid;
}

std::string utf8_lossy(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size());
  for (size_t i = 0; i < bytes.size();) {
    bool valid;
    const size_t n = sequence_length(bytes, i, &valid);
    if (valid) {
      out.append(bytes.substr(i, n));
    } else {
      out += "\xEF\xBF\xBD";
    }
    i += n;
  }
  return out;
}

bool is_white_space(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F ||
         c == 0x3000;
}

size_t utf8_length_at(std::string_view s, size_t i) {
  char32_t cp;
  return utf8_decode(s, i, &cp);
}

// Start of the code point that ends at s[end).
size_t utf8_previous(std::string_view s, size_t end) {
  size_t i = end - 1;
  while (i > 0 && (static_cast<unsigned char>(s[i]) & 0xC0) == 0x80) --i;
  return i;
}

namespace {

// Unicode normalization (NFC / NFD) with tokenizers' tables

constexpr char32_t kHangulBase = 0xAC00, kHangulL = 0x1100, kHangulV = 0x1161, kHangulT = 0x11A7;
constexpr char32_t kHangulVCount = 21, kHangulTCount = 28, kHangulCount = 11172;

uint8_t combining_class(char32_t c) {
  const auto& table = unicode_data::kCombiningClasses;
  const auto it = std::upper_bound(std::begin(table), std::end(table), c,
                                   [](char32_t v, const auto& r) { return v < r.first; });
  if (it == std::begin(table)) return 0;
  const auto& r = *std::prev(it);
  return c <= r.last ? r.ccc : 0;
}

void decompose_into(char32_t c, std::u32string& out) {
  if (c >= kHangulBase && c < kHangulBase + kHangulCount) {
    const char32_t s = c - kHangulBase;
    out += kHangulL + s / (kHangulVCount * kHangulTCount);
    out += kHangulV + (s % (kHangulVCount * kHangulTCount)) / kHangulTCount;
    if (s % kHangulTCount != 0) out += kHangulT + s % kHangulTCount;
    return;
  }
  const auto& table = unicode_data::kDecompositions;
  const auto it = std::lower_bound(std::begin(table), std::end(table), c,
                                   [](const auto& d, char32_t v) { return d.code_point < v; });
  if (it == std::end(table) || it->code_point != c) {
    out += c;
    return;
  }
  out.append(unicode_data::kDecompositionData + it->offset, it->length);
}

std::optional<char32_t> compose_pair(char32_t a, char32_t b) {
  if (a >= kHangulL && a < kHangulL + 19 && b >= kHangulV && b < kHangulV + kHangulVCount) {
    return kHangulBase + ((a - kHangulL) * kHangulVCount + (b - kHangulV)) * kHangulTCount;
  }
  if (a >= kHangulBase && a < kHangulBase + kHangulCount &&
      (a - kHangulBase) % kHangulTCount == 0 && b > kHangulT && b < kHangulT + kHangulTCount) {
    return a + (b - kHangulT);
  }
  const auto& table = unicode_data::kCompositions;
  const auto it = std::lower_bound(
      std::begin(table), std::end(table), std::make_pair(a, b),
      [](const auto& c, const auto& v) { return std::make_pair(c.first, c.second) < v; });
  if (it == std::end(table) || it->first != a || it->second != b) return std::nullopt;
  return it->composite;
}

// NFD: full canonical decomposition, then marks sorted by combining class.
std::u32string canonical_decomposition(std::string_view s) {
  std::u32string out;
  for (size_t i = 0; i < s.size();) {
    char32_t cp;
    i += utf8_decode(s, i, &cp);
    decompose_into(cp, out);
  }
  for (size_t i = 0; i < out.size();) {
    if (combining_class(out[i]) == 0) {
      ++i;
      continue;
    }
    size_t end = i;
    while (end < out.size() && combining_class(out[end]) != 0) ++end;
    std::stable_sort(out.begin() + i, out.begin() + end, [](char32_t x, char32_t y) {
      return combining_class(x) < combining_class(y);
    });
    i = end;
  }
  return out;
}

// The canonical composition algorithm of UAX #15.
void compose(std::u32string& cps) {
  std::u32string out;
  size_t starter = std::u32string::npos;
  uint8_t last_class = 0;
  for (const char32_t c : cps) {
    const uint8_t cc = combining_class(c);
    if (starter != std::u32string::npos) {
      const bool adjacent = out.size() == starter + 1;
      if (adjacent || (last_class != 0 && last_class < cc)) {
        if (const auto composite = compose_pair(out[starter], c)) {
          out[starter] = *composite;
          continue;
        }
      }
    }
    if (cc == 0) starter = out.size();
    out += c;
    last_class = cc;
  }
  cps.swap(out);
}

std::string to_utf8(const std::u32string& cps) {
  std::string out;
  for (const char32_t c : cps) utf8_append(out, c);
  return out;
}

bool all_bytes_below(std::string_view s, unsigned char limit) {
  return std::all_of(s.begin(), s.end(),
                     [limit](char c) { return static_cast<unsigned char>(c) < limit; });
}

// Byte-level alphabet (GPT-2's bytes_to_unicode)

struct ByteAlphabet {
  std::array<std::string, 256> byte_to_utf8;
  std::vector<int16_t> char_to_byte;  // indexed by code point; -1 outside the alphabet

  ByteAlphabet() : char_to_byte(256 + 256, -1) {
    char32_t extra = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
      const char32_t cp = printable ? static_cast<char32_t>(b) : extra++;
      utf8_append(byte_to_utf8[b], cp);
      char_to_byte[cp] = static_cast<int16_t>(b);
    }
  }
};

const ByteAlphabet& byte_alphabet() {
  static const ByteAlphabet alphabet;
  return alphabet;
}

}  // namespace

std::string nfc(std::string_view s) {
  // Below U+0300 (lead bytes below 0xCC) text is always in NFC: the common case costs a scan.
  if (all_bytes_below(s, 0xCC)) return std::string(s);
  std::u32string cps = canonical_decomposition(s);
  compose(cps);
  return to_utf8(cps);
}

std::string nfd(std::string_view s) {
  if (all_bytes_below(s, 0x80)) return std::string(s);
  return to_utf8(canonical_decomposition(s));
}

std::string bytes_to_alphabet(std::string_view bytes) {
  const ByteAlphabet& a = byte_alphabet();
  std::string out;
  out.reserve(bytes.size() * 2);
  for (const char b : bytes) out += a.byte_to_utf8[static_cast<unsigned char>(b)];
  return out;
}

// The bytes a token spells in the alphabet, or nothing when a character lies outside it.
std::optional<std::string> alphabet_to_bytes(std::string_view token) {
  const ByteAlphabet& a = byte_alphabet();
  std::string out;
  for (size_t i = 0; i < token.size();) {
    char32_t cp;
    i += utf8_decode(token, i, &cp);
    if (cp >= a.char_to_byte.size() || a.char_to_byte[cp] < 0) return std::nullopt;
    out += static_cast<char>(a.char_to_byte[cp]);
  }
  return out;
}

}  // namespace qlora::tokenizers::detail
