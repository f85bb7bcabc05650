// How many label tokens a batch trains on: the denominator of the loss of
// an accumulation window, so N micro-batches equal one batch of N times
// the size.
#pragma once

#include <ATen/core/Tensor.h>

namespace qlora::train::detail {

// Labels other than -100 after the one-token shift of causal LM training.
inline int64_t count_label_tokens(const at::Tensor& labels) {
  if (labels.size(1) < 2) return 0;  // an empty batch (a data-parallel rank's short last step)
  return labels.narrow(1, 1, labels.size(1) - 1).ne(-100).sum().item<int64_t>();
}

}  // namespace qlora::train::detail
