#include "ops/optimizer_checks.h"

#include <c10/util/Exception.h>

#include <string>

#include "ops/checks.h"

namespace qlora::detail {
namespace {

// Adam with decoupled weight decay is the optimizer QLoRA trains with;
// bitsandbytes calls it "adam" (its AdamW is adam with weight_decay).
void check_name(std::string_view op, std::string_view name) {
  TORCH_CHECK(name == "adam" || name == "adamw", "qlora::", op, ": optimizer_name \"",
              std::string(name), "\" is not supported; supported: \"adam\", \"adamw\"");
}

void check_param_and_grad(std::string_view op, const at::Tensor& g, const at::Tensor& p,
                          int64_t step) {
  check_float_dtype(op, "g", g.scalar_type());
  TORCH_CHECK(g.scalar_type() == p.scalar_type(), "qlora::", op,
              ": g and p must have the same dtype, got ", g.scalar_type(), " and ",
              p.scalar_type());
  TORCH_CHECK(g.sym_numel() == p.sym_numel(), "qlora::", op,
              ": g and p must have the same number of elements, got ", g.sym_numel(), " and ",
              p.sym_numel());
  check_same_device(op, p, "p", g, "g");
  TORCH_CHECK(g.is_contiguous() && p.is_contiguous(), "qlora::", op,
              ": g and p must be contiguous");
  TORCH_CHECK(step >= 1, "qlora::", op, ": step counts from 1, got ", step);
}

void check_state(std::string_view op, const char* name, const at::Tensor& state,
                 const at::Tensor& p, at::ScalarType dtype) {
  TORCH_CHECK(state.scalar_type() == dtype, "qlora::", op, ": ", name, " must be ", dtype, ", got ",
              state.scalar_type());
  TORCH_CHECK(state.sym_numel() == p.sym_numel(), "qlora::", op, ": ", name, " has ",
              state.sym_numel(), " elements but p has ", p.sym_numel());
  check_same_device(op, p, "p", state, name);
  TORCH_CHECK(state.is_contiguous(), "qlora::", op, ": ", name, " must be contiguous");
}

}  // namespace

void check_optimizer_update_32bit(std::string_view optimizer_name, const at::Tensor& g,
                                  const at::Tensor& p, const at::Tensor& state1,
                                  const std::optional<at::Tensor>& state2,
                                  const std::optional<at::Tensor>& unorm_vec, double max_unorm,
                                  int64_t step) {
  constexpr std::string_view op = "optimizer_update_32bit";
  check_name(op, optimizer_name);
  check_param_and_grad(op, g, p, step);
  check_state(op, "state1", state1, p, at::kFloat);
  TORCH_CHECK(state2.has_value() && state2->defined(), "qlora::", op,
              ": adam needs state2 (the second moment)");
  check_state(op, "state2", *state2, p, at::kFloat);
  TORCH_CHECK(max_unorm <= 0, "qlora::", op,
              ": max_unorm (update-norm clipping, LAMB/LARS) is not supported, got ", max_unorm);
  (void)unorm_vec;
}

void check_optimizer_update_8bit_blockwise(std::string_view optimizer_name, const at::Tensor& g,
                                           const at::Tensor& p, const at::Tensor& state1,
                                           const std::optional<at::Tensor>& state2, int64_t step,
                                           const at::Tensor& qmap1,
                                           const std::optional<at::Tensor>& qmap2,
                                           const at::Tensor& absmax1,
                                           const std::optional<at::Tensor>& absmax2) {
  constexpr std::string_view op = "optimizer_update_8bit_blockwise";
  check_name(op, optimizer_name);
  check_param_and_grad(op, g, p, step);
  const bool has_second = state2.has_value() && state2->defined() && qmap2.has_value() &&
                          qmap2->defined() && absmax2.has_value() && absmax2->defined();
  TORCH_CHECK(has_second, "qlora::", op,
              ": adam needs state2, qmap2 and absmax2 (the second moment)");
  const c10::SymInt blocks = num_blocks(p.sym_numel(), kOptimizerBlock);
  const auto check_quantized = [&](const char* s, const at::Tensor& state, const char* q,
                                   const at::Tensor& qmap, const char* a,
                                   const at::Tensor& absmax) {
    check_state(op, s, state, p, at::kByte);
    TORCH_CHECK(qmap.scalar_type() == at::kFloat && qmap.sym_numel() == 256, "qlora::", op, ": ", q,
                " must be a float32 tensor of 256 values, got ", qmap.scalar_type(),
                qmap.sym_sizes());
    check_same_device(op, p, "p", qmap, q);
    TORCH_CHECK(absmax.scalar_type() == at::kFloat && absmax.sym_numel() == blocks, "qlora::", op,
                ": ", a, " must be float32 with one value per ", kOptimizerBlock, " elements (",
                blocks, "), got ", absmax.scalar_type(), absmax.sym_sizes());
    check_same_device(op, p, "p", absmax, a);
  };
  check_quantized("state1", state1, "qmap1", qmap1, "absmax1", absmax1);
  check_quantized("state2", *state2, "qmap2", *qmap2, "absmax2", *absmax2);
}

}  // namespace qlora::detail
