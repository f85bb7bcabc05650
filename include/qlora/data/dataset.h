// A tokenised dataset in memory: its splits (random or by key) and load_dataset, which reads,
// renders and tokenises a file.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "qlora/data/prompt_template.h"
#include "qlora/data/records.h"
#include "qlora/data/tokenize.h"

namespace qlora::tokenizers {
class Tokenizer;
}

namespace qlora::data {

struct DatasetSplit;

class Dataset {
 public:
  Dataset() = default;
  explicit Dataset(std::vector<Example> examples);

  size_t size() const { return examples_.size(); }
  bool empty() const { return examples_.empty(); }
  const Example& operator[](size_t i) const { return examples_[i]; }
  const std::vector<Example>& examples() const { return examples_; }
  int64_t num_tokens() const;
  int64_t num_label_tokens() const;
  int64_t max_example_length() const;

  // In place, with shuffled_indices(size(), seed).
  void shuffle(uint64_t seed);
  // Exactly round(size * eval_fraction) examples, picked by shuffled_indices(size, seed), go to
  // eval; both parts keep the dataset's order. eval_fraction must be in [0, 1].
  DatasetSplit split(double eval_fraction, uint64_t seed) const;
  // Examples with equal keys land on the same side. A key goes to eval when
  // (top 53 bits of splitmix64(stable_hash(key) ^ seed)) / 2^53 < eval_fraction: stable (a key's
  // side never depends on the other keys, so adding data moves nothing) but only approximately the
  // fraction.
  DatasetSplit split_by_key(const std::function<std::string(const Example&)>& key_fn,
                            double eval_fraction, uint64_t seed) const;

  // Hash of every example's tokens and labels: a restored loader checks it is fed the same data.
  uint64_t fingerprint() const;

 private:
  std::vector<Example> examples_;
};

struct DatasetSplit {
  Dataset train;
  Dataset eval;
};

struct LoadOptions {
  DataFormat format = DataFormat::kAuto;
  Strictness strictness = Strictness::kReject;
  TextUnit text_unit = TextUnit::kParagraph;
  PromptTemplate prompt_template = PromptTemplate::alpaca();
  TokenizeOptions tokenize;
};

struct LoadedDataset {
  Dataset dataset;
  std::vector<DataIssue> issues;  // skipped records (kSkip) and dropped examples
  int64_t records = 0;            // records read
  int64_t truncated = 0;          // examples that max_length cut
};

// read_records + tokenize_records.
LoadedDataset load_dataset(const std::string& path, const tokenizers::Tokenizer& tokenizer,
                           const LoadOptions& options);

}  // namespace qlora::data
