// Schemas of the fused optimizer updates, as torch.ops.bitsandbytes declares
// them: one kernel updates a parameter and its (32-bit or 8-bit blockwise)
// states in place. Kernels: cpu/optimizer_kernels.cpp,
// cuda/optimizer_kernels.cu, meta/optimizer_meta.cpp; the per-element math
// is common/adamw_math.h.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(qlora, m) {
  m.def(
      "optimizer_update_32bit(str optimizer_name, Tensor(a0!) g, Tensor(a1!) p, Tensor(a2!) "
      "state1, Tensor(a3!)? state2, Tensor(a4!)? unorm_vec, float max_unorm, float param_norm, "
      "float beta1, float beta2, float beta3, float alpha, float eps, float weight_decay, int "
      "step, float lr, float gnorm_scale, bool skip_zeros=False) -> ()");
  m.def(
      "optimizer_update_8bit_blockwise(str optimizer_name, Tensor(a0!) g, Tensor(a1!) p, "
      "Tensor(a2!) state1, Tensor(a3!)? state2, float beta1, float beta2, float beta3, float "
      "alpha, float eps, int step, float lr, Tensor(a4!) qmap1, Tensor(a5!)? qmap2, Tensor(a6!) "
      "absmax1, Tensor(a7!)? absmax2, float weight_decay, float gnorm_scale, bool "
      "skip_zeros=False) -> ()");
}
