// Batching and packing: examples laid into right-padded [B, T] rows.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>
#include <cstdint>
#include <vector>

#include "qlora/data/tokenize.h"

namespace qlora::data {

// All tensors int64 [B, T] on the CPU, rows right-padded to the longest row of the batch.
struct Batch {
  at::Tensor input_ids;       // pad id on padding
  at::Tensor labels;          // kIgnoreIndex on padding
  at::Tensor attention_mask;  // 1 on tokens, 0 on padding
  at::Tensor position_ids;    // 0, 1, 2, ... restarting at every example of a packed row
  at::Tensor segment_ids;     // 1, 2, 3, ... per example within the row, 0 on padding; attend
                              // only where the segment ids of query and key are equal
  int64_t label_tokens = 0;   // labels != kIgnoreIndex: the loss's normaliser
  int64_t num_examples = 0;
};

// A batch of no rows ([0, 0] tensors): a data-parallel rank's share of an
// epoch's last, short step.
Batch empty_batch();

// Each row holds one or more examples laid end to end. Throws std::invalid_argument on an empty
// batch or row.

Batch collate_rows(const std::vector<std::vector<const Example*>>& rows, int32_t pad_id);
// One example per row.
Batch collate_examples(const std::vector<const Example*>& examples, int32_t pad_id);

// Greedy next-fit packing of examples, taken in `order`, into rows of at most max_length
// tokens: an example joins the current row when it fits, else starts a new one. Order is kept,
// so a shuffled order gives shuffled rows. Returns indices into `lengths` per row. Throws
// std::invalid_argument if an example is longer than max_length.
std::vector<std::vector<size_t>> pack_greedy(const std::vector<int64_t>& lengths,
                                             const std::vector<size_t>& order, int64_t max_length);

}  // namespace qlora::data
