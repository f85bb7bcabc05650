// Meta kernels of the fused optimizer updates: the argument checks only
// (they return nothing and write in place), so traced optimizer steps see
// the same errors as real ones.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "ops/optimizer_checks.h"

namespace qlora::meta {
namespace {

void optimizer_update_32bit_meta(std::string_view optimizer_name, at::Tensor& g, at::Tensor& p,
                                 at::Tensor& state1, const std::optional<at::Tensor>& state2,
                                 const std::optional<at::Tensor>& unorm_vec, double max_unorm,
                                 double, double, double, double, double, double, double,
                                 int64_t step, double, double, bool) {
  detail::check_optimizer_update_32bit(optimizer_name, g, p, state1, state2, unorm_vec, max_unorm,
                                       step);
}

void optimizer_update_8bit_blockwise_meta(
    std::string_view optimizer_name, at::Tensor& g, at::Tensor& p, at::Tensor& state1,
    const std::optional<at::Tensor>& state2, double, double, double, double, double, int64_t step,
    double, at::Tensor& qmap1, const std::optional<at::Tensor>& qmap2, at::Tensor& absmax1,
    const std::optional<at::Tensor>& absmax2, double, double, bool) {
  detail::check_optimizer_update_8bit_blockwise(optimizer_name, g, p, state1, state2, step, qmap1,
                                                qmap2, absmax1, absmax2);
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora, Meta, m) {
  m.impl("optimizer_update_32bit", &optimizer_update_32bit_meta);
  m.impl("optimizer_update_8bit_blockwise", &optimizer_update_8bit_blockwise_meta);
}

}  // namespace qlora::meta
