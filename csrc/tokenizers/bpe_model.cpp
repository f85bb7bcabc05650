// BPE merging as tokenizers' BPE::merge_word and Word::merge_all (see bpe_model.h).
#include "tokenizers/bpe_model.h"

#include <algorithm>
#include <mutex>
#include <queue>

#include "tokenizers/unicode.h"
#include "util/strings.h"

namespace qlora::tokenizers::detail {

using util::starts_with;

BpeModel::BpeModel(Vocab vocab, const MergeList& merges, BpeOptions options, const ErrorFn& error)
    : vocab_(std::move(vocab)), options_(std::move(options)) {
  index_vocab();
  build_merges(merges, error);
  if (options_.unk_token) unk_id_ = token_to_id(*options_.unk_token);
  if (options_.byte_fallback) index_byte_tokens();
}

void BpeModel::tokenize(const std::string& word, std::vector<int32_t>& out) const {
  if (word.empty()) return;
  if (options_.ignore_merges) {
    if (const auto it = vocab_.find(word); it != vocab_.end()) {
      out.push_back(it->second);
      return;
    }
  }
  const bool cacheable = word.size() < kMaxCachedWord;
  if (cacheable) {
    std::shared_lock<std::shared_mutex> lock(cache_->mutex);
    if (const auto it = cache_->words.find(word); it != cache_->words.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  std::vector<int32_t> ids = merge_word(word);
  out.insert(out.end(), ids.begin(), ids.end());
  if (cacheable) {
    std::unique_lock<std::shared_mutex> lock(cache_->mutex);
    if (cache_->words.size() >= kCacheCapacity) cache_->words.clear();
    cache_->words.emplace(word, std::move(ids));
  }
}

void BpeModel::index_vocab() {
  int32_t max_id = -1;
  for (const auto& entry : vocab_) max_id = std::max(max_id, entry.second);
  id_to_token_.assign(static_cast<size_t>(max_id + 1), nullptr);
  // Node-based map: the addresses survive moves of the model.
  for (const auto& [token, id] : vocab_) id_to_token_[id] = &token;
}

void BpeModel::index_byte_tokens() {
  static const char* const kHex = "0123456789ABCDEF";
  for (int b = 0; b < 256; ++b) {
    const std::string name = std::string("<0x") + kHex[b >> 4] + kHex[b & 15] + ">";
    byte_ids_[b] = token_to_id(name).value_or(-1);
  }
}

void BpeModel::build_merges(const MergeList& merges, const ErrorFn& error) {
  merges_.reserve(merges.size());
  const std::string& prefix = options_.continuing_subword_prefix;
  for (size_t rank = 0; rank < merges.size(); ++rank) {
    const auto& [a, b] = merges[rank];
    const auto a_id = token_to_id(a);
    if (!a_id) error(rank, "token \"" + a + "\" is not in the vocabulary");
    const auto b_id = token_to_id(b);
    if (!b_id) error(rank, "token \"" + b + "\" is not in the vocabulary");
    const bool strip = !prefix.empty() && starts_with(b, prefix);
    const std::string merged = a + (strip ? b.substr(prefix.size()) : b);
    const auto new_id = token_to_id(merged);
    if (!new_id) error(rank, "merged token \"" + merged + "\" is not in the vocabulary");
    // A repeated pair keeps its last rank, as tokenizers' HashMap insertion does.
    merges_[pair_key(*a_id, *b_id)] = {static_cast<int32_t>(rank), *new_id};
  }
}

std::vector<int32_t> BpeModel::merge_word(const std::string& word) const {
  std::vector<Symbol> symbols;
  symbols.reserve(word.size());
  size_t unk_len = 0;  // bytes of a pending unknown symbol (0: none)
  for (size_t i = 0; i < word.size();) {
    const size_t len = utf8_length_at(word, i);
    std::string piece = word.substr(i, len);
    if (i > 0) piece.insert(0, options_.continuing_subword_prefix);
    if (i + len == word.size()) piece += options_.end_of_word_suffix;
    i += len;
    if (const auto id = token_to_id(piece)) {
      if (unk_len > 0) add_symbol(symbols, *unk_id_, unk_len), unk_len = 0;
      add_symbol(symbols, *id, len);
    } else if (options_.byte_fallback && add_byte_fallback(piece, symbols)) {
      // (each byte became a symbol)
    } else if (unk_id_) {
      if (unk_len > 0 && !options_.fuse_unk) add_symbol(symbols, *unk_id_, unk_len), unk_len = 0;
      unk_len += len;
    }
    // Without an unknown token, tokenizers drops the character.
  }
  if (unk_len > 0) add_symbol(symbols, *unk_id_, unk_len);
  merge_all(symbols);
  std::vector<int32_t> ids;
  for (const Symbol& s : symbols) {
    if (s.len != 0) ids.push_back(s.id);
  }
  return ids;
}

bool BpeModel::add_byte_fallback(const std::string& piece, std::vector<Symbol>& symbols) const {
  for (const char b : piece) {
    if (byte_ids_[static_cast<unsigned char>(b)] < 0) return false;
  }
  for (const char b : piece) add_symbol(symbols, byte_ids_[static_cast<unsigned char>(b)], 1);
  return true;
}

void BpeModel::merge_all(std::vector<Symbol>& symbols) const {
  std::priority_queue<Merge, std::vector<Merge>, MergeAfter> queue;
  for (size_t i = 0; i + 1 < symbols.size(); ++i) {
    if (const MergeTarget* m = find_merge(symbols[i].id, symbols[i + 1].id)) {
      queue.push({static_cast<int32_t>(i), m->rank, m->new_id});
    }
  }
  while (!queue.empty()) {
    const Merge top = queue.top();
    queue.pop();
    Symbol& current = symbols[top.pos];
    if (current.len == 0 || current.next == -1) continue;
    const int32_t right_pos = current.next;
    const Symbol right = symbols[right_pos];
    // An entry made stale by an earlier merge no longer names this pair.
    const MergeTarget* target = find_merge(current.id, right.id);
    if (target == nullptr || target->new_id != top.new_id) continue;
    current.id = top.new_id;
    current.len += right.len;
    current.next = right.next;
    symbols[right_pos].len = 0;
    if (right.next >= 0) symbols[right.next].prev = top.pos;
    if (current.prev >= 0) {
      if (const MergeTarget* m = find_merge(symbols[current.prev].id, current.id)) {
        queue.push({current.prev, m->rank, m->new_id});
      }
    }
    if (current.next >= 0) {
      if (const MergeTarget* m = find_merge(current.id, symbols[current.next].id)) {
        queue.push({top.pos, m->rank, m->new_id});
      }
    }
  }
}

}  // namespace qlora::tokenizers::detail
