#include "io/name_hints.h"

#include <algorithm>
#include <utility>

#include "util/strings.h"

namespace qlora::io {

namespace {

size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diagonal = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t substitute = diagonal + (a[i - 1] == b[j - 1] ? 0 : 1);
      diagonal = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, substitute});
    }
  }
  return row[b.size()];
}

}  // namespace

std::string close_names_hint(const std::string& name, const std::vector<std::string>& names) {
  constexpr size_t kMaxHints = 3;
  const size_t max_distance = std::max<size_t>(2, name.size() / 5);
  std::vector<std::pair<size_t, std::string>> hits;
  for (const std::string& candidate : names) {
    const size_t length_gap = candidate.size() > name.size() ? candidate.size() - name.size()
                                                             : name.size() - candidate.size();
    if (util::ends_with(candidate, "." + name) || util::ends_with(name, "." + candidate)) {
      hits.emplace_back(0, candidate);
    } else if (length_gap <= max_distance) {
      const size_t d = edit_distance(name, candidate);
      if (d <= max_distance) hits.emplace_back(d, candidate);
    }
  }
  if (hits.empty()) return "";
  std::sort(hits.begin(), hits.end());
  std::string out = "; did you mean ";
  for (size_t i = 0; i < std::min(kMaxHints, hits.size()); ++i) {
    if (i > 0) out += " or ";
    out += "'" + hits[i].second + "'";
  }
  return out + "?";
}
}  // namespace qlora::io
