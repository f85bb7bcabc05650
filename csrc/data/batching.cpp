// Collating examples into padded [B, T] tensors, with optional packing of several examples per
// row.
#include <ATen/ops/empty.h>

#include <algorithm>
#include <stdexcept>

#include "data/data_internal.h"

namespace qlora::data {
namespace {

int64_t row_length(const std::vector<const Example*>& row) {
  int64_t n = 0;
  for (const Example* e : row) n += e->size();
  return n;
}

// Raw int64 views of the batch's tensors, filled one row at a time.
struct RowWriter {
  int64_t* ids;
  int64_t* labels;
  int64_t* mask;
  int64_t* positions;
  int64_t* segments;

  void write_example(const Example& e, int64_t segment, int64_t* at) {
    for (int64_t t = 0; t < e.size(); ++t, ++*at) {
      ids[*at] = e.input_ids[t];
      labels[*at] = e.labels[t];
      mask[*at] = 1;
      positions[*at] = t;
      segments[*at] = segment;
    }
  }
  void pad(int64_t pad_id, int64_t from, int64_t to) {
    std::fill(ids + from, ids + to, pad_id);
    std::fill(labels + from, labels + to, int64_t{kIgnoreIndex});
    std::fill(mask + from, mask + to, 0);
    std::fill(positions + from, positions + to, 0);
    std::fill(segments + from, segments + to, 0);
  }
};

void check_rows(const std::vector<std::vector<const Example*>>& rows) {
  if (rows.empty()) throw std::invalid_argument("collate: empty batch");
  for (const auto& row : rows) {
    if (row.empty()) throw std::invalid_argument("collate: empty row");
    for (const Example* e : row) {
      if (e == nullptr || e->labels.size() != e->input_ids.size()) {
        throw std::invalid_argument("collate: example without labels matching its input_ids");
      }
    }
  }
}

}  // namespace

Batch empty_batch() {
  Batch out;
  for (at::Tensor* t :
       {&out.input_ids, &out.labels, &out.attention_mask, &out.position_ids, &out.segment_ids})
    *t = at::empty({0, 0}, at::kLong);
  return out;
}

Batch collate_rows(const std::vector<std::vector<const Example*>>& rows, int32_t pad_id) {
  check_rows(rows);
  int64_t width = 0;
  for (const auto& row : rows) width = std::max(width, row_length(row));
  const int64_t batch = static_cast<int64_t>(rows.size());
  Batch out;
  auto make = [&] { return at::empty({batch, width}, at::kLong); };
  out.input_ids = make();
  out.labels = make();
  out.attention_mask = make();
  out.position_ids = make();
  out.segment_ids = make();
  RowWriter w{out.input_ids.data_ptr<int64_t>(), out.labels.data_ptr<int64_t>(),
              out.attention_mask.data_ptr<int64_t>(), out.position_ids.data_ptr<int64_t>(),
              out.segment_ids.data_ptr<int64_t>()};
  for (int64_t b = 0; b < batch; ++b) {
    int64_t at = b * width;
    int64_t segment = 0;
    for (const Example* e : rows[b]) {
      w.write_example(*e, ++segment, &at);
      out.label_tokens += e->supervised_tokens();
      ++out.num_examples;
    }
    w.pad(pad_id, at, (b + 1) * width);
  }
  return out;
}

Batch collate_examples(const std::vector<const Example*>& examples, int32_t pad_id) {
  std::vector<std::vector<const Example*>> rows;
  rows.reserve(examples.size());
  for (const Example* e : examples) rows.push_back({e});
  return collate_rows(rows, pad_id);
}

std::vector<std::vector<size_t>> pack_greedy(const std::vector<int64_t>& lengths,
                                             const std::vector<size_t>& order, int64_t max_length) {
  std::vector<std::vector<size_t>> rows;
  int64_t used = 0;
  for (const size_t i : order) {
    if (i >= lengths.size()) throw std::invalid_argument("pack_greedy: index out of range");
    const int64_t n = lengths[i];
    if (n > max_length) {
      throw std::invalid_argument("pack_greedy: example " + std::to_string(i) + " has " +
                                  std::to_string(n) + " tokens, more than max_length " +
                                  std::to_string(max_length));
    }
    if (rows.empty() || used + n > max_length) {
      rows.emplace_back();
      used = 0;
    }
    rows.back().push_back(i);
    used += n;
  }
  return rows;
}

}  // namespace qlora::data
