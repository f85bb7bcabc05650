// Dropout whose mask is a function of a seed (common/dropout_hash.h), so
// backward regenerates it instead of keeping a mask tensor.
#pragma once

#include <ATen/core/Tensor.h>

namespace qlora::nn {

// Inverted dropout with drop probability p in [0, 1): elements kept with
// probability 1 - p are scaled by 1 / (1 - p). Differentiable in x. One
// 64-bit seed per call is drawn from the default CPU generator, so a
// recomputation under a restored generator state (gradient checkpointing,
// resume) draws the same mask. Runs the qlora::hash_dropout op (CPU, CUDA,
// Meta, autograd) with that seed.
at::Tensor hash_dropout(const at::Tensor& x, double p);

// Mixed into every seed drawn after it is set (0: none). Data-parallel ranks
// set their rank: the generator stays the same on every rank (one checkpoint
// restores them all) while each rank draws its own masks.
void set_hash_dropout_stream(uint64_t stream);

}  // namespace qlora::nn
