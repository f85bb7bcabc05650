// The pre-tokenizers of a tokenizer.json (see pre_tokenizers.h).
#include "tokenizers/pre_tokenizers.h"

#include <algorithm>

#include "tokenizers/unicode.h"
#include "util/strings.h"

namespace qlora::tokenizers::detail {

namespace {

using util::starts_with;

// NormalizedString::split: the pattern's matches and the gaps between them cover the text;
// the behavior decides which spans survive and how delimiters attach.
void split_piece(const Piece& piece, const std::vector<Span>& matches, SplitBehavior behavior,
                 bool invert, std::vector<Piece>& out) {
  std::vector<std::pair<Span, bool>> spans;  // (span, is a match)
  size_t prev = 0;
  for (const Span& m : matches) {
    if (prev != m.first) spans.push_back({{prev, m.first}, invert});
    spans.push_back({m, !invert});
    prev = m.second;
  }
  if (prev != piece.text.size()) spans.push_back({{prev, piece.text.size()}, invert});

  std::vector<std::pair<Span, bool>> kept;  // (span, removed)
  bool previous_match = false;
  switch (behavior) {
    case SplitBehavior::kRemoved:
      kept = spans;
      break;
    case SplitBehavior::kIsolated:
      for (const auto& s : spans) kept.push_back({s.first, false});
      break;
    case SplitBehavior::kContiguous:
      for (const auto& [span, is_match] : spans) {
        if (is_match == previous_match && !kept.empty()) {
          kept.back().first.second = span.second;
        } else {
          kept.push_back({span, false});
        }
        previous_match = is_match;
      }
      break;
    case SplitBehavior::kMergedWithPrevious:
      for (const auto& [span, is_match] : spans) {
        if (is_match && !previous_match && !kept.empty()) {
          kept.back().first.second = span.second;
        } else {
          kept.push_back({span, false});
        }
        previous_match = is_match;
      }
      break;
    case SplitBehavior::kMergedWithNext:
      for (auto it = spans.rbegin(); it != spans.rend(); ++it) {
        const auto& [span, is_match] = *it;
        if (is_match && !previous_match && !kept.empty()) {
          kept.back().first.first = span.first;
        } else {
          kept.push_back({span, false});
        }
        previous_match = is_match;
      }
      std::reverse(kept.begin(), kept.end());
      break;
  }
  for (const auto& [span, removed] : kept) {
    if (removed || span.second == span.first) continue;
    out.push_back({piece.text.substr(span.first, span.second - span.first),
                   piece.at_origin && span.first == 0});
  }
}

SplitBehavior parse_behavior(const JsonNode& node) {
  const std::string b = node.str();
  if (b == "Removed") return SplitBehavior::kRemoved;
  if (b == "Isolated") return SplitBehavior::kIsolated;
  if (b == "MergedWithPrevious") return SplitBehavior::kMergedWithPrevious;
  if (b == "MergedWithNext") return SplitBehavior::kMergedWithNext;
  if (b == "Contiguous") return SplitBehavior::kContiguous;
  node.fail("unknown split behavior \"" + b + "\"");
}

}  // namespace

PreTokenizer::Step split_step(Pattern pattern, SplitBehavior behavior, bool invert) {
  return [pattern = std::move(pattern), behavior, invert](const Piece& p, std::vector<Piece>& out) {
    split_piece(p, pattern.find_all(p.text), behavior, invert, out);
  };
}

PreTokenizer::Step byte_level_step(bool add_prefix_space, bool use_regex) {
  return [add_prefix_space, use_regex](const Piece& p, std::vector<Piece>& out) {
    Piece piece = p;
    if (add_prefix_space && !starts_with(piece.text, " ")) piece.text.insert(0, " ");
    const size_t first = out.size();
    if (use_regex) {
      split_piece(piece, gpt2_regex().find_all(piece.text), SplitBehavior::kIsolated, false, out);
    } else {
      out.push_back(std::move(piece));
    }
    for (size_t i = first; i < out.size(); ++i) out[i].text = bytes_to_alphabet(out[i].text);
  };
}

PrependScheme parse_prepend_scheme(const JsonNode& node) {
  if (const auto scheme = node.find("prepend_scheme")) {
    const std::string s = scheme->str();
    if (s == "always") return PrependScheme::kAlways;
    if (s == "first") return PrependScheme::kFirst;
    if (s == "never") return PrependScheme::kNever;
    scheme->fail("expected \"always\", \"first\" or \"never\"");
  }
  // Files older than prepend_scheme have add_prefix_space.
  return node.bool_or("add_prefix_space", true) ? PrependScheme::kAlways : PrependScheme::kNever;
}

std::string replace_all(std::string_view s, std::string_view from, std::string_view to) {
  std::string out;
  size_t pos = 0;
  for (size_t hit; (hit = s.find(from, pos)) != std::string_view::npos; pos = hit + from.size()) {
    out.append(s.substr(pos, hit - pos));
    out.append(to);
  }
  out.append(s.substr(pos));
  return out;
}

PreTokenizer::Step metaspace_step(std::string replacement, PrependScheme scheme, bool split) {
  return [replacement, scheme, split](const Piece& p, std::vector<Piece>& out) {
    Piece piece{replace_all(p.text, " ", replacement), p.at_origin};
    const bool prepend =
        !starts_with(piece.text, replacement) &&
        (scheme == PrependScheme::kAlways || (scheme == PrependScheme::kFirst && piece.at_origin));
    if (prepend) piece.text.insert(0, replacement);
    if (split) {
      split_piece(piece, Pattern::literal(replacement).find_all(piece.text),
                  SplitBehavior::kMergedWithNext, false, out);
    } else {
      out.push_back(std::move(piece));
    }
  };
}

std::string single_char(const JsonNode& node) {
  const std::string s = node.str();
  if (s.empty() || utf8_length_at(s, 0) != s.size()) node.fail("expected a single character");
  return s;
}

void parse_pre_tokenizer(const JsonNode& node, PreTokenizer& out) {
  const std::string type = node.type();
  if (type == "Sequence") {
    const JsonNode list = node.at("pretokenizers");
    for (size_t i = 0; i < list.size(); ++i) parse_pre_tokenizer(list[i], out);
  } else if (type == "Split") {
    out.add(split_step(parse_pattern(node.at("pattern")), parse_behavior(node.at("behavior")),
                       node.bool_or("invert", false)));
  } else if (type == "ByteLevel") {
    out.add(
        byte_level_step(node.bool_or("add_prefix_space", true), node.bool_or("use_regex", true)));
  } else if (type == "Digits") {
    // char::is_numeric is \p{N}; each digit is a match of its own.
    out.add(split_step(Pattern::regex("\\p{N}"),
                       node.bool_or("individual_digits", false) ? SplitBehavior::kIsolated
                                                                : SplitBehavior::kContiguous,
                       false));
  } else if (type == "Metaspace") {
    out.add(metaspace_step(single_char(node.at("replacement")), parse_prepend_scheme(node),
                           node.bool_or("split", true)));
  } else {
    node.at("type").fail("pre-tokenizer \"" + type +
                         "\" is not supported (ByteLevel, Split, Digits, Metaspace, Sequence)");
  }
}

}  // namespace qlora::tokenizers::detail
