// DataLoader: epochs of micro-batches in a reproducible order, resumable from a LoaderState.
#include <algorithm>
#include <nlohmann/json.hpp>
#include <stdexcept>

#include "data/data_internal.h"

namespace qlora::data {
namespace {

void check_options(const Dataset& dataset, const LoaderOptions& o) {
  if (dataset.empty()) throw std::invalid_argument("DataLoader: the dataset is empty");
  if (o.num_shards < 1 || o.shard < 0 || o.shard >= o.num_shards)
    throw std::invalid_argument("DataLoader: shard " + std::to_string(o.shard) + " of " +
                                std::to_string(o.num_shards) + " shards");
  if (o.micro_batch_size < 1) {
    throw std::invalid_argument("DataLoader: micro_batch_size must be >= 1");
  }
  if (o.packing && o.max_length < dataset.max_example_length()) {
    throw std::invalid_argument("DataLoader: packing needs max_length >= the longest example (" +
                                std::to_string(dataset.max_example_length()) + " tokens), got " +
                                std::to_string(o.max_length));
  }
  // Otherwise every epoch would end before its first batch and a step loop would never stop.
  if (o.drop_last && static_cast<int64_t>(dataset.size()) < o.micro_batch_size) {
    throw std::invalid_argument("DataLoader: drop_last with fewer examples than micro_batch_size");
  }
}

// Unsigned values travel as decimal strings: JSON readers in other languages lose 64-bit
// integers above 2^53.
uint64_t parse_u64(const nlohmann::json& j, const char* key) {
  const std::string s = j.at(key).get<std::string>();
  size_t used = 0;
  const unsigned long long v = std::stoull(s, &used);
  if (used != s.size() || s.empty() || s[0] == '-') throw std::invalid_argument(s);
  return v;
}

}  // namespace

std::string LoaderState::to_json() const {
  nlohmann::json j = {{"seed", std::to_string(seed)},
                      {"epoch", epoch},
                      {"position", position},
                      {"rows", rows},
                      {"fingerprint", std::to_string(fingerprint)}};
  return j.dump();
}

LoaderState LoaderState::from_json(const std::string& text) {
  try {
    const nlohmann::json j = nlohmann::json::parse(text);
    LoaderState s;
    s.seed = parse_u64(j, "seed");
    s.epoch = j.at("epoch").get<int64_t>();
    s.position = j.at("position").get<int64_t>();
    s.fingerprint = parse_u64(j, "fingerprint");
    if (j.contains("rows")) s.rows = j.at("rows").get<int64_t>();
    if (s.epoch < 0 || s.position < 0) throw std::invalid_argument("negative epoch or position");
    return s;
  } catch (const std::exception& e) {
    throw std::invalid_argument(std::string("LoaderState: not a loader state: ") + e.what());
  }
}

DataLoader::DataLoader(std::shared_ptr<const Dataset> dataset, LoaderOptions options)
    : dataset_(std::move(dataset)), options_(options) {
  if (!dataset_) throw std::invalid_argument("DataLoader: null dataset");
  check_options(*dataset_, options_);
  dataset_fingerprint_ = dataset_->fingerprint();
  plan_epoch();
}

// The epoch's rows depend only on (dataset, options, seed, epoch): that is what makes a
// LoaderState enough to resume.
void DataLoader::plan_epoch() {
  const size_t n = dataset_->size();
  std::vector<size_t> order(n);
  for (size_t i = 0; i < n; ++i) order[i] = i;
  if (options_.shuffle) {
    std::mt19937_64 rng(detail::mix_seed(options_.seed, static_cast<uint64_t>(epoch_)));
    detail::fisher_yates(order, rng);
  }
  rows_.clear();
  if (options_.packing) {
    std::vector<int64_t> lengths(n);
    for (size_t i = 0; i < n; ++i) lengths[i] = (*dataset_)[i].size();
    rows_ = pack_greedy(lengths, order, options_.max_length);
  } else {
    rows_.reserve(n);
    for (const size_t i : order) rows_.push_back({i});
  }
}

int64_t DataLoader::batches_per_epoch() const {
  const int64_t rows = static_cast<int64_t>(rows_.size());
  const int64_t b = options_.micro_batch_size * options_.num_shards;
  return options_.drop_last ? rows / b : (rows + b - 1) / b;
}

std::optional<Batch> DataLoader::next() {
  if (position_ >= batches_per_epoch()) {
    ++epoch_;
    position_ = 0;
    plan_epoch();
    return std::nullopt;
  }
  const size_t first = static_cast<size_t>((position_ * options_.num_shards + options_.shard) *
                                           options_.micro_batch_size);
  if (first >= rows_.size()) {
    ++position_;
    return empty_batch();
  }
  const size_t last =
      std::min(rows_.size(), first + static_cast<size_t>(options_.micro_batch_size));
  std::vector<std::vector<const Example*>> rows;
  for (size_t r = first; r < last; ++r) {
    std::vector<const Example*> row;
    for (const size_t i : rows_[r]) row.push_back(&(*dataset_)[i]);
    rows.push_back(std::move(row));
  }
  ++position_;
  return collate_rows(rows, options_.pad_id);
}

uint64_t DataLoader::config_fingerprint() const {
  uint64_t h = dataset_fingerprint_;
  for (const int64_t v :
       {int64_t{options_.shuffle}, options_.micro_batch_size, int64_t{options_.packing},
        options_.packing ? options_.max_length : 0, int64_t{options_.drop_last}}) {
    h = detail::splitmix64(h ^ static_cast<uint64_t>(v));
  }
  return h;
}

LoaderState DataLoader::state() const {
  // The last step of an epoch may serve fewer rows than a full step.
  const int64_t rows =
      std::min<int64_t>(position_ * options_.micro_batch_size * options_.num_shards, rows_.size());
  LoaderState s;
  s.seed = options_.seed;
  s.epoch = epoch_;
  s.position = position_;
  s.rows = rows;
  s.fingerprint = config_fingerprint();
  return s;
}

void DataLoader::restore(const LoaderState& state) {
  if (state.fingerprint != config_fingerprint()) {
    throw std::invalid_argument(
        "DataLoader::restore: the state was saved with a different dataset or different batching "
        "options (shuffle, micro_batch_size, packing, max_length, drop_last)");
  }
  // A refused state must leave the loader as it was.
  const uint64_t old_seed = options_.seed;
  const int64_t old_epoch = epoch_;
  options_.seed = state.seed;
  epoch_ = state.epoch;
  plan_epoch();
  // Rows make a state portable between shard counts; a step must still start
  // where one of this loader's steps starts. A state from before sharding
  // counts batches of one shard.
  const int64_t n = static_cast<int64_t>(rows_.size());
  const int64_t step_rows = options_.micro_batch_size * options_.num_shards;
  int64_t position = -1;
  std::string why;
  if (state.rows < 0 && options_.num_shards == 1) {
    position = state.position;
  } else {
    const int64_t rows =
        state.rows >= 0 ? state.rows : std::min(n, state.position * options_.micro_batch_size);
    if (rows > n || rows < 0)
      position = -1;  // past the end
    else if (rows == n)
      position = batches_per_epoch();  // the epoch is served; its last step may be short
    else if (rows % step_rows == 0)
      position = rows / step_rows;
    else
      why = "the state stopped after " + std::to_string(rows) + " rows of epoch " +
            std::to_string(state.epoch) + ", not a multiple of this run's " +
            std::to_string(step_rows) + " rows per step (micro_batch_size x ranks)";
  }
  if (why.empty() && (position < 0 || position > batches_per_epoch()))
    why = "position " + std::to_string(state.rows >= 0 ? state.rows : state.position) +
          (state.rows >= 0 ? " rows" : "") + " is past the end of epoch " +
          std::to_string(state.epoch);
  if (!why.empty()) {
    options_.seed = old_seed;
    epoch_ = old_epoch;
    plan_epoch();
    throw std::invalid_argument("DataLoader::restore: " + why);
  }
  position_ = position;
}

}  // namespace qlora::data
