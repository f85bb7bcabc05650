// Cross-entropy of a frozen linear head without the logits tensor.
#pragma once

#include <ATen/core/Tensor.h>

namespace qlora::nn {

// sum_i cross_entropy(hidden[i] @ weight^T, labels[i]) as a float32 scalar,
// differentiable with respect to `hidden` (weight is frozen: a weight that
// requires grad is an error). Rows go through in chunks of about
// `chunk_logits` logits; when a gradient is needed, each chunk's gradient
// (softmax - one_hot) @ weight is computed at once and its logits freed, so
// the memory held is one chunk instead of [rows, vocab] logits, their
// log-probabilities and their gradient (about 450 MB for 768 tokens of a
// 49k vocabulary). The loss itself is computed as torch's cross_entropy is:
// log_softmax in float32, then the negated label log-probability. The
// default chunk, 4 M logits (16 MB in float32, ~85 rows of a 49k vocabulary),
// keeps the head's GEMMs efficient and its transient memory small.
//   hidden  [R, H] float32 / bfloat16 / float16
//   weight  [V, H] same dtype
//   labels  int64 [R], each in [0, V) (select the labelled rows first)
at::Tensor linear_cross_entropy_sum(const at::Tensor& hidden, const at::Tensor& weight,
                                    const at::Tensor& labels,
                                    int64_t chunk_logits = int64_t{1} << 22);

}  // namespace qlora::nn
