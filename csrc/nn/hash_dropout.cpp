#include "qlora/nn/hash_dropout.h"

#include <ATen/CPUGeneratorImpl.h>

#include <mutex>

#include "qlora/ops.h"

namespace qlora::nn {
namespace {

// From the CPU generator on every device, so restoring its state (the
// recompute tape, resume) is all a recomputation needs to redraw the mask.
int64_t draw_seed() {
  at::Generator gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  return static_cast<int64_t>(gen.get<at::CPUGeneratorImpl>()->random64());
}

}  // namespace

at::Tensor hash_dropout(const at::Tensor& x, double p) {
  TORCH_CHECK(p >= 0 && p < 1, "hash_dropout: p must be in [0, 1), got ", p);
  if (p == 0) return x;
  return qlora::hash_dropout(x, p, draw_seed());
}

}  // namespace qlora::nn
