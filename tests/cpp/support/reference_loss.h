// The causal LM loss as Hugging Face computes it, for the tests to compare
// the trainer's fused, accumulation-normalised loss against.
#pragma once

#include <ATen/ops/cross_entropy_loss.h>

namespace qlora::test {

// Token-level cross-entropy summed over the label tokens of `labels`
// (unshifted, -100 ignored), as transformers' ForCausalLMLoss before its
// division: position t predicts token t + 1.
inline at::Tensor summed_causal_lm_loss(const at::Tensor& logits, const at::Tensor& labels) {
  const int64_t V = logits.size(-1);
  const at::Tensor shift_logits = logits.narrow(1, 0, logits.size(1) - 1).reshape({-1, V});
  const at::Tensor shift_labels = labels.narrow(1, 1, labels.size(1) - 1).reshape({-1});
  return at::cross_entropy_loss(shift_logits.to(at::kFloat), shift_labels, {}, at::Reduction::Sum,
                                -100);
}

}  // namespace qlora::test
