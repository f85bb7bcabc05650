#include "qlora/nn/hash_dropout.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/ops/dropout.h>
#include <ATen/ops/empty.h>
#include <torch/autograd.h>

#include <mutex>

#include "../cpu/dropout_kernel.h"

namespace qlora::nn {
namespace {

uint64_t draw_seed() {
  at::Generator gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  return gen.get<at::CPUGeneratorImpl>()->random64();
}

at::Tensor apply_mask(const at::Tensor& in, const detail::DropoutKey& key) {
  const at::Tensor src = in.contiguous();
  at::Tensor out = at::empty_like(src, at::MemoryFormat::Contiguous);
  cpu::dropout_apply(src.const_data_ptr<float>(), out.mutable_data_ptr<float>(), src.numel(), 0,
                     key);
  return out;
}

// Saves two integers and p, never the mask or the input.
class HashDropout : public torch::autograd::Function<HashDropout> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, double p) {
    const uint64_t seed = draw_seed();
    ctx->saved_data["seed"] = static_cast<int64_t>(seed);
    ctx->saved_data["p"] = p;
    return apply_mask(x, detail::dropout_key(seed, p));
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_out) {
    const auto seed = static_cast<uint64_t>(ctx->saved_data["seed"].toInt());
    const double p = ctx->saved_data["p"].toDouble();
    at::Tensor g = grad_out[0];
    if (g.defined()) g = apply_mask(g.to(at::kFloat), detail::dropout_key(seed, p));
    return {g, at::Tensor()};
  }
};

}  // namespace

at::Tensor hash_dropout(const at::Tensor& x, double p) {
  TORCH_CHECK(p >= 0 && p < 1, "hash_dropout: p must be in [0, 1), got ", p);
  if (p == 0) return x;
  if (!x.device().is_cpu() || x.scalar_type() != at::kFloat) return at::dropout(x, p, true);
  return HashDropout::apply(x, p);
}

}  // namespace qlora::nn
