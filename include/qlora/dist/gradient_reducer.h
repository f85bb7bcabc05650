// The part of DistributedDataParallel a LoRA fine-tune needs, for C++ (LibTorch
// has no DDP module): the trainable parameters' gradients summed over the
// ranks in buckets, each bucket's all-reduce started from backward as soon as
// its last gradient is accumulated, so communication overlaps the rest of
// backward. Frozen parameters (the 4-bit base) are never communicated.
//
// Buckets hold parameters in reverse registration order (the order backward
// reaches them) and are started strictly in bucket order on every rank, so the
// ranks issue the same collectives in the same order even when a rank had no
// batch or a parameter got no gradient.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "qlora/dist/communicator.h"

namespace qlora::dist {

class GradientReducer {
 public:
  // `params` must be leaves that require grad, the same list in the same
  // order on every rank.
  GradientReducer(Communicator& comm, std::vector<at::Tensor> params,
                  int64_t bucket_bytes = 4 << 20);
  ~GradientReducer();
  GradientReducer(const GradientReducer&) = delete;
  GradientReducer& operator=(const GradientReducer&) = delete;

  // Call before the backward that completes the local gradients (the last
  // micro-batch of an accumulation window): its hooks then start buckets.
  // Earlier micro-batches accumulate locally, as DDP's no_sync does.
  void prepare_for_backward();
  // After that backward, or instead of it when this rank had no micro-batch:
  // starts the buckets not yet started (a missing gradient counts as zeros),
  // waits for all and writes the sums into each parameter's .grad.
  void finish();

  int64_t num_buckets() const;
  // Bucket starts that happened inside backward during the last window (for tests/benchmarks).
  int64_t started_during_backward() const;

  struct State;

 private:
  std::shared_ptr<State> s_;
};

// Throws std::runtime_error naming the first parameter whose value differs
// between rank 0 and this rank (identical initialisation check).
void check_identical(Communicator& comm, const std::vector<at::Tensor>& params,
                     const std::vector<std::string>& names);

}  // namespace qlora::dist
