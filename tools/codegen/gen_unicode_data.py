#!/usr/bin/env python3
"""Writes csrc/tokenizers/unicode_data.h: NFC tables as HF tokenizers applies them, and the
letters/numbers that Oniguruma (regex engine of tokenizers) knows beyond PCRE2's Unicode tables.
Every table is checked against the installed `tokenizers` code point by code point."""
import sys
import unicodedata

from tokenizers import Regex, normalizers, pre_tokenizers

NFC, NFD = normalizers.NFC(), normalizers.NFD()
ALL = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
HANGUL = range(0xAC00, 0xD7A4)


def ranges(cps):
    out = []
    for c in sorted(cps):
        if out and out[-1][1] == c - 1:
            out[-1][1] = c
        else:
            out.append([c, c])
    return out


def onig_class(cls, pcre_base):
    """Code points Oniguruma puts in `cls` beyond the PCRE2 class `pcre_base` (a predicate on
    the general category), which must be a subset of it."""
    removed = pre_tokenizers.Split(Regex(cls), "removed")
    extra = []
    for i in range(0, len(ALL), 4096):
        chunk = ALL[i:i + 4096]
        kept = set()
        for _, (a, b) in removed.pre_tokenize_str("".join(map(chr, chunk))):
            kept.update(range(a, b))
        for j, c in enumerate(chunk):
            in_base = pcre_base(unicodedata.category(chr(c)))
            assert not (in_base and j in kept), f"{cls}: U+{c:04X} in the PCRE2 base, not in Oniguruma"
            if j not in kept and not in_base:
                extra.append(c)
    return ranges(extra)


# PCRE2 10.42 knows Unicode 14.0, the version of this Python's unicodedata.
assert unicodedata.unidata_version == "14.0.0"


def combining_classes():
    """Python's classes, less the marks tokenizers' older tables leave at 0 (seen by reordering)."""
    out = {}
    for c in ALL:
        cc = unicodedata.combining(chr(c))
        if cc == 0:
            continue
        probe = "a" + chr(c) + "\u0334" if cc > 1 else "a\u0301" + chr(c)
        if NFC.normalize_str(probe) == unicodedata.normalize("NFC", probe):
            out[c] = cc
    runs = []
    for c in sorted(out):
        if runs and runs[-1][1] == c - 1 and runs[-1][2] == out[c]:
            runs[-1][1] = c
        else:
            runs.append([c, c, out[c]])
    return runs


def decompositions():
    """Full canonical decompositions, as tokenizers' NFD yields them (Hangul is algorithmic)."""
    out = {}
    for c in ALL:
        if c in HANGUL:
            continue
        d = NFD.normalize_str(chr(c))
        if d != chr(c):
            out[c] = [ord(x) for x in d]
    return out


def compositions():
    """Primary composites: two-character canonical decompositions that tokenizers' NFC recomposes."""
    out = []
    for c in ALL:
        if c in HANGUL:
            continue
        raw = unicodedata.decomposition(chr(c))
        if not raw or raw.startswith("<"):
            continue
        parts = [int(x, 16) for x in raw.split()]
        if len(parts) == 2 and NFC.normalize_str(chr(parts[0]) + chr(parts[1])) == chr(c):
            out.append((parts[0], parts[1], c))
    return sorted(out)


def rows(items, per_line, fmt):
    cells = [fmt(x) for x in items]
    return "\n".join("    " + " ".join(cells[i:i + per_line]) for i in range(0, len(cells), per_line))


def main(path):
    letters = onig_class(r"\p{L}", lambda cat: cat[0] == "L")
    numbers = onig_class(r"\p{N}", lambda cat: cat[0] == "N")
    word = onig_class(r"\w", lambda cat: cat[0] in "LM" or cat in ("Nd", "Pc"))
    digits = onig_class(r"\d", lambda cat: cat == "Nd")
    ccc = combining_classes()
    dec = decompositions()
    comp = compositions()
    data, index = [], []
    for c in sorted(dec):
        index.append((c, len(data), len(dec[c])))
        data += dec[c]
    rng = lambda r: "{0x%X, 0x%X}," % tuple(r)
    with open(path, "w") as f:
        f.write(HEADER)
        f.write("inline constexpr Range kExtraLetters[] = {\n%s\n};\n" % rows(letters, 4, rng))
        f.write("inline constexpr Range kExtraNumbers[] = {\n%s\n};\n" % rows(numbers, 4, rng))
        f.write("inline constexpr Range kExtraWord[] = {\n%s\n};\n" % rows(word, 4, rng))
        f.write("inline constexpr Range kExtraDigits[] = {\n%s\n};\n\n" % rows(digits, 4, rng))
        f.write("inline constexpr CombiningClass kCombiningClasses[] = {\n%s\n};\n\n"
                % rows(ccc, 4, lambda r: "{0x%X, 0x%X, %d}," % tuple(r)))
        f.write("inline constexpr Decomposition kDecompositions[] = {\n%s\n};\n"
                % rows(index, 4, lambda r: "{0x%X, %d, %d}," % r))
        f.write("inline constexpr char32_t kDecompositionData[] = {\n%s\n};\n\n"
                % rows(data, 8, lambda c: "0x%X," % c))
        f.write("inline constexpr Composition kCompositions[] = {\n%s\n};\n\n"
                % rows(comp, 3, lambda r: "{0x%X, 0x%X, 0x%X}," % r))
        f.write("}  // namespace qlora::tokenizers::unicode_data\n")


HEADER = """// Unicode tables for the tokenizers, generated from Python's unicodedata (Unicode 14.0) and
// checked code point by code point against HF tokenizers 0.23.3; do not edit by hand.
//
// - kExtraLetters / kExtraNumbers / kExtraWord / kExtraDigits: code points that Oniguruma
//   (the regex engine of HF tokenizers, Unicode 16) puts in \\p{L} / \\p{N} / \\w / \\d beyond
//   PCRE2 10.42's (Unicode 14) \\p{L} / \\p{N} / [\\p{L}\\p{M}\\p{Nd}\\p{Pc}] / \\p{Nd}, which
//   are subsets of them.
// - The NFC tables reproduce tokenizers' normalizer, whose tables are older than Unicode 14:
//   marks it does not know have combining class 0 here, and compositions it does not perform
//   (U+11935 U+11930) are absent.
//
// Regenerate with tools/codegen/gen_unicode_data.py (it needs the venv's tokenizers):
//   .venv/bin/python tools/codegen/gen_unicode_data.py csrc/tokenizers/unicode_data.h
#pragma once

#include <cstdint>

// The generated tables keep their layout.
// clang-format off
namespace qlora::tokenizers::unicode_data {

struct Range {
  char32_t first, last;
};
struct CombiningClass {
  char32_t first, last;
  uint8_t ccc;
};
// kDecompositionData[offset, offset + length) is the full canonical decomposition.
struct Decomposition {
  char32_t code_point;
  uint16_t offset;
  uint8_t length;
};
struct Composition {
  char32_t first, second, composite;
};

"""

if __name__ == "__main__":
    main(sys.argv[1])
