// Dataset: the tokenised examples, with deterministic shuffling and train/eval splits.
#include <algorithm>
#include <cmath>
#include <stdexcept>

#include "data/data_internal.h"

namespace qlora::data {
namespace {

void check_fraction(double eval_fraction) {
  if (!(eval_fraction >= 0.0 && eval_fraction <= 1.0)) {
    throw std::invalid_argument("eval_fraction must be in [0, 1], got " +
                                std::to_string(eval_fraction));
  }
}

// A 64-bit hash mapped to [0, 1) through its top 53 bits, exactly representable as a double.
double unit_interval(uint64_t h) { return static_cast<double>(h >> 11) * 0x1.0p-53; }

uint64_t hash_combine(uint64_t h, uint64_t value) { return detail::splitmix64(h ^ value); }

}  // namespace

Dataset::Dataset(std::vector<Example> examples) : examples_(std::move(examples)) {}

int64_t Dataset::num_tokens() const {
  int64_t n = 0;
  for (const Example& e : examples_) n += e.size();
  return n;
}

int64_t Dataset::num_label_tokens() const {
  int64_t n = 0;
  for (const Example& e : examples_) n += e.supervised_tokens();
  return n;
}

int64_t Dataset::max_example_length() const {
  int64_t n = 0;
  for (const Example& e : examples_) n = std::max(n, e.size());
  return n;
}

void Dataset::shuffle(uint64_t seed) {
  std::vector<Example> shuffled;
  shuffled.reserve(examples_.size());
  for (const size_t i : shuffled_indices(examples_.size(), seed)) {
    shuffled.push_back(std::move(examples_[i]));
  }
  examples_ = std::move(shuffled);
}

DatasetSplit Dataset::split(double eval_fraction, uint64_t seed) const {
  check_fraction(eval_fraction);
  const size_t n = examples_.size();
  const auto n_eval = static_cast<size_t>(std::llround(static_cast<double>(n) * eval_fraction));
  std::vector<bool> to_eval(n, false);
  const std::vector<size_t> order = shuffled_indices(n, seed);
  for (size_t k = 0; k < n_eval; ++k) to_eval[order[k]] = true;
  DatasetSplit out;
  for (size_t i = 0; i < n; ++i) {
    (to_eval[i] ? out.eval.examples_ : out.train.examples_).push_back(examples_[i]);
  }
  return out;
}

DatasetSplit Dataset::split_by_key(const std::function<std::string(const Example&)>& key_fn,
                                   double eval_fraction, uint64_t seed) const {
  check_fraction(eval_fraction);
  DatasetSplit out;
  for (const Example& e : examples_) {
    const uint64_t h = detail::splitmix64(stable_hash(key_fn(e)) ^ seed);
    (unit_interval(h) < eval_fraction ? out.eval.examples_ : out.train.examples_).push_back(e);
  }
  return out;
}

uint64_t Dataset::fingerprint() const {
  uint64_t h = hash_combine(0, examples_.size());
  for (const Example& e : examples_) {
    h = hash_combine(h, static_cast<uint64_t>(e.size()));
    for (size_t t = 0; t < e.input_ids.size(); ++t) {
      // Both values in one word: ids and labels are 32-bit.
      const int32_t label = t < e.labels.size() ? e.labels[t] : kIgnoreIndex;
      const uint64_t pair = (static_cast<uint64_t>(static_cast<uint32_t>(e.input_ids[t])) << 32) |
                            static_cast<uint32_t>(label);
      h = hash_combine(h, pair);
    }
  }
  return h;
}

LoadedDataset load_dataset(const std::string& path, const tokenizers::Tokenizer& tokenizer,
                           const LoadOptions& options) {
  ReadResult read = read_records(path, options.format, options.strictness, options.text_unit);
  TokenizeResult tokenized =
      tokenize_records(read.records, options.prompt_template, tokenizer, options.tokenize);
  LoadedDataset out;
  out.records = static_cast<int64_t>(read.records.size());
  out.truncated = tokenized.truncated;
  out.issues = std::move(read.issues);
  out.issues.insert(out.issues.end(), tokenized.issues.begin(), tokenized.issues.end());
  out.dataset = Dataset(std::move(tokenized.examples));
  return out;
}

}  // namespace qlora::data
