// The resumable, deterministic loader: epochs of (optionally shuffled, packed) batches and a
// state that restores it exactly.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "qlora/data/batching.h"
#include "qlora/data/dataset.h"

namespace qlora::data {

struct LoaderOptions {
  int64_t micro_batch_size = 1;
  bool shuffle = true;  // a new order every epoch, from (seed, epoch)
  uint64_t seed = 0;
  bool packing = false;
  int64_t max_length = 0;  // the packed row length; required when packing
  bool drop_last = false;  // drop an epoch's last, smaller batch
  int32_t pad_id = 0;      // see padding_id()
  // Data parallelism: one step serves num_shards * micro_batch_size rows of
  // the epoch's order and this loader returns slice `shard` of them, so N
  // shards of micro-batch m see what one loader of 2m (or of m with N
  // accumulation steps) sees. A shard whose slice of an epoch's last step is
  // empty gets an empty batch (0 rows), to keep the ranks in step.
  int64_t num_shards = 1;
  int64_t shard = 0;
};

// Everything needed to continue exactly where a loader stopped. The RNG state is (seed, epoch):
// epoch e's order is a Fisher-Yates shuffle driven by a fresh mt19937_64 seeded with
// splitmix64(seed ^ splitmix64(e)), so no engine state has to be saved.
struct LoaderState {
  uint64_t seed = 0;
  int64_t epoch = 0;
  int64_t position = 0;  // steps (batches of every shard) already served in this epoch
  // Rows of the epoch's order served: what a loader with another num_shards
  // resumes from (it must be a multiple of its micro_batch_size * num_shards).
  int64_t rows = -1;  // -1: a state from before sharding (rows = position * micro_batch_size)
  // Of the dataset and the options that shape batches (shuffle, micro batch, packing, length,
  // drop_last); restore() refuses a state taken on different data or settings.
  uint64_t fingerprint = 0;

  std::string to_json() const;
  static LoaderState from_json(const std::string& json);  // throws std::invalid_argument
};

class DataLoader {
 public:
  // Throws std::invalid_argument on an empty dataset, micro_batch_size < 1, packing without a
  // max_length that fits every example, or drop_last with fewer examples than one batch.
  DataLoader(std::shared_ptr<const Dataset> dataset, LoaderOptions options);

  // The next batch of the current epoch, or nullopt when the epoch is over, in which case the
  // loader has moved on to the start of the next epoch. So `while (auto b = loader.next())`
  // runs exactly one epoch.
  std::optional<Batch> next();

  int64_t epoch() const { return epoch_; }
  int64_t position() const { return position_; }
  int64_t batches_per_epoch() const;  // steps of the current epoch (packing makes it vary)

  LoaderState state() const;
  // Throws std::invalid_argument if the state's fingerprint does not match this loader's.
  void restore(const LoaderState& state);

 private:
  void plan_epoch();
  uint64_t config_fingerprint() const;

  std::shared_ptr<const Dataset> dataset_;
  LoaderOptions options_;
  uint64_t dataset_fingerprint_ = 0;
  int64_t epoch_ = 0;
  int64_t position_ = 0;
  std::vector<std::vector<size_t>> rows_;  // this epoch's rows: example indices
};

}  // namespace qlora::data
