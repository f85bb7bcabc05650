// CUDA dispatch-key kernels of the fused optimizer updates.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/op_utils.h"
#include "ops/optimizer_checks.h"

namespace qlora::cuda {
namespace {

void optimizer_update_32bit_cuda(std::string_view optimizer_name, at::Tensor& g, at::Tensor& p,
                                 at::Tensor& state1, const std::optional<at::Tensor>& state2,
                                 const std::optional<at::Tensor>& unorm_vec, double max_unorm,
                                 double /*param_norm*/, double beta1, double beta2,
                                 double /*beta3*/, double /*alpha*/, double eps,
                                 double weight_decay, int64_t step, double lr, double gnorm_scale,
                                 bool skip_zeros) {
  detail::check_optimizer_update_32bit(optimizer_name, g, p, state1, state2, unorm_vec, max_unorm,
                                       step);
  require_cuda("optimizer_update_32bit", p, "p");
  const c10::cuda::CUDAGuard guard(p.device());
  const auto s = detail::make_adamw_scalars(beta1, beta2, eps, weight_decay, step, lr, gnorm_scale,
                                            skip_zeros);
  at::Tensor v = *state2;
  C10_CUDA_CHECK(optimizer_update_32bit(g.const_data_ptr(), p.mutable_data_ptr(),
                                        to_dtype(p.scalar_type()), state1.mutable_data_ptr<float>(),
                                        v.mutable_data_ptr<float>(), p.numel(), s,
                                        at::cuda::getCurrentCUDAStream()));
}

void optimizer_update_8bit_blockwise_cuda(
    std::string_view optimizer_name, at::Tensor& g, at::Tensor& p, at::Tensor& state1,
    const std::optional<at::Tensor>& state2, double beta1, double beta2, double /*beta3*/,
    double /*alpha*/, double eps, int64_t step, double lr, at::Tensor& qmap1,
    const std::optional<at::Tensor>& qmap2, at::Tensor& absmax1,
    const std::optional<at::Tensor>& absmax2, double weight_decay, double gnorm_scale,
    bool skip_zeros) {
  detail::check_optimizer_update_8bit_blockwise(optimizer_name, g, p, state1, state2, step, qmap1,
                                                qmap2, absmax1, absmax2);
  require_cuda("optimizer_update_8bit_blockwise", p, "p");
  const c10::cuda::CUDAGuard guard(p.device());
  const auto s = detail::make_adamw_scalars(beta1, beta2, eps, weight_decay, step, lr, gnorm_scale,
                                            skip_zeros);
  at::Tensor q2 = *state2, a2 = *absmax2;
  const at::Tensor map1 = qmap1.contiguous(), map2 = qmap2->contiguous();
  at::Tensor bad = new_bad_block_flag(p);
  C10_CUDA_CHECK(optimizer_update_8bit_blockwise(
      g.const_data_ptr(), p.mutable_data_ptr(), to_dtype(p.scalar_type()),
      state1.mutable_data_ptr<uint8_t>(), q2.mutable_data_ptr<uint8_t>(),
      map1.const_data_ptr<float>(), map2.const_data_ptr<float>(), absmax1.mutable_data_ptr<float>(),
      a2.mutable_data_ptr<float>(), p.numel(), s, flag_ptr(bad), at::cuda::getCurrentCUDAStream()));
  raise_if_bad("optimizer_update_8bit_blockwise", bad, detail::kOptimizerBlock);
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora, CUDA, m) {
  m.impl("optimizer_update_32bit", &optimizer_update_32bit_cuda);
  m.impl("optimizer_update_8bit_blockwise", &optimizer_update_8bit_blockwise_cuda);
}

}  // namespace qlora::cuda
