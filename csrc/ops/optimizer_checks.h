// Argument validation of the fused optimizer updates, shared by the CPU,
// CUDA and Meta kernels (one message per mistake, naming op and argument).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string_view>

namespace qlora::detail {

// The 8-bit states are quantised in blocks of this many elements (bitsandbytes' layout).
constexpr int64_t kOptimizerBlock = 256;

void check_optimizer_update_32bit(std::string_view optimizer_name, const at::Tensor& g,
                                  const at::Tensor& p, const at::Tensor& state1,
                                  const std::optional<at::Tensor>& state2,
                                  const std::optional<at::Tensor>& unorm_vec, double max_unorm,
                                  int64_t step);

void check_optimizer_update_8bit_blockwise(std::string_view optimizer_name, const at::Tensor& g,
                                           const at::Tensor& p, const at::Tensor& state1,
                                           const std::optional<at::Tensor>& state2, int64_t step,
                                           const at::Tensor& qmap1,
                                           const std::optional<at::Tensor>& qmap2,
                                           const at::Tensor& absmax1,
                                           const std::optional<at::Tensor>& absmax2);

}  // namespace qlora::detail
