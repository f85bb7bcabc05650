// The BPE model of tokenizers: a word's characters (with byte fallback or the unknown token)
// merged by rank, leftmost first, with a shared cache of merged words.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <shared_mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace qlora::tokenizers::detail {

struct BpeOptions {
  std::optional<std::string> unk_token;
  std::string continuing_subword_prefix;
  std::string end_of_word_suffix;
  bool fuse_unk = false;
  bool byte_fallback = false;
  // Words found whole in the vocabulary skip the merges (Llama 3).
  bool ignore_merges = false;
};

class BpeModel {
 public:
  using Vocab = std::unordered_map<std::string, int32_t>;
  using MergeList = std::vector<std::pair<std::string, std::string>>;
  // Called with the index of the offending merge and the message; does not return.
  using ErrorFn = std::function<void(size_t, const std::string&)>;

  BpeModel() = default;
  BpeModel(Vocab vocab, const MergeList& merges, BpeOptions options, const ErrorFn& error);

  void tokenize(const std::string& word, std::vector<int32_t>& out) const;

  std::optional<int32_t> token_to_id(std::string_view token) const {
    const auto it = vocab_.find(std::string(token));
    if (it == vocab_.end()) return std::nullopt;
    return it->second;
  }

  const std::string* id_to_token(int32_t id) const {
    if (id < 0 || static_cast<size_t>(id) >= id_to_token_.size()) return nullptr;
    return id_to_token_[id];
  }

  size_t id_count() const { return id_to_token_.size(); }
  size_t vocab_entries() const { return vocab_.size(); }
  std::optional<int32_t> unk_id() const { return unk_id_; }

 private:
  static constexpr size_t kMaxCachedWord = 256;
  static constexpr size_t kCacheCapacity = 200000;

  struct MergeTarget {
    int32_t rank;
    int32_t new_id;
  };
  struct Symbol {
    int32_t id;
    int32_t prev;
    int32_t next;
    size_t len;  // bytes; 0 once merged into its left neighbour
  };
  struct Merge {
    int32_t pos;
    int32_t rank;
    int32_t new_id;
  };
  // Lowest rank first, then leftmost (tokenizers' Merge ordering).
  struct MergeAfter {
    bool operator()(const Merge& a, const Merge& b) const {
      return a.rank != b.rank ? a.rank > b.rank : a.pos > b.pos;
    }
  };
  struct Cache {
    std::shared_mutex mutex;
    std::unordered_map<std::string, std::vector<int32_t>> words;
  };

  static uint64_t pair_key(int32_t a, int32_t b) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
  }

  void index_vocab();

  void index_byte_tokens();

  void build_merges(const MergeList& merges, const ErrorFn& error);

  // BPE::merge_word: characters (with byte fallback / unk), then Word::merge_all.
  std::vector<int32_t> merge_word(const std::string& word) const;

  static void add_symbol(std::vector<Symbol>& symbols, int32_t id, size_t len) {
    const auto n = static_cast<int32_t>(symbols.size());
    if (n > 0) symbols.back().next = n;
    symbols.push_back({id, n - 1, -1, len});
  }

  bool add_byte_fallback(const std::string& piece, std::vector<Symbol>& symbols) const;

  const MergeTarget* find_merge(int32_t a, int32_t b) const {
    const auto it = merges_.find(pair_key(a, b));
    return it == merges_.end() ? nullptr : &it->second;
  }

  // Word::merge_all: repeatedly apply the best-ranked merge, leftmost first.
  void merge_all(std::vector<Symbol>& symbols) const;

  Vocab vocab_;
  std::vector<const std::string*> id_to_token_;
  std::unordered_map<uint64_t, MergeTarget> merges_;
  BpeOptions options_;
  std::optional<int32_t> unk_id_;
  std::array<int32_t, 256> byte_ids_{};
  std::unique_ptr<Cache> cache_ = std::make_unique<Cache>();
};

}  // namespace qlora::tokenizers::detail
