// Meta kernel of hash_dropout: the output is shaped like the input (as the
// CPU and CUDA kernels make it, contiguous), for torch.compile / export.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "ops/checks.h"

namespace qlora::meta {
namespace {

at::Tensor hash_dropout_meta(const at::Tensor& input, double p, int64_t /*seed*/) {
  detail::check_hash_dropout(input, p);
  return at::empty_symint(input.sym_sizes(), input.options());
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora, Meta, m) { m.impl("hash_dropout", &hash_dropout_meta); }

}  // namespace qlora::meta
