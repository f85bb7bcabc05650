// Schema of the counter-based dropout op. The mask is a pure function of
// (seed, element index) (common/dropout_hash.h), so backward regenerates it
// from two saved numbers instead of a mask tensor, every device computes
// the same mask, and a recomputation (gradient checkpointing, resume) with
// the same seed drops the same elements. Kernels: cpu/dropout_kernel.cpp,
// cuda/dropout_kernel.cu, meta/dropout_meta.cpp; autograd:
// autograd/hash_dropout_autograd.cpp.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(qlora, m) {
  // Inverted dropout: elements kept with probability 1 - p are scaled by
  // 1 / (1 - p). Differentiable in input; the gradient is the same op.
  m.def("hash_dropout(Tensor input, float p, int seed) -> Tensor");
}
