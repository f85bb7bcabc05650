// Autograd of matmul_4bit, registered on the Autograd key: gradients flow to
// x and bias only (the 4-bit weight is a frozen buffer). Forward re-enters
// the dispatcher below autograd; backward calls dequantize_4bit as an op, so
// both run on any backend and trace under torch.compile / AOT autograd.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/sum.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <map>
#include <string>
#include <tuple>
#include <vector>

#include "autograd/matmul_4bit_autograd.h"
#include "ops/dense_linear.h"
#include "ops/matmul_4bit_composite.h"
#include "qlora/ops.h"

namespace qlora {
namespace {

at::Tensor matmul_4bit_below_autograd(const at::Tensor& x, const at::Tensor& B,
                                      const at::Tensor& absmax, int64_t blocksize,
                                      std::string_view quant_type, c10::SymIntArrayRef shapeB,
                                      const std::optional<at::Tensor>& bias) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("qlora::matmul_4bit", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         int64_t, std::string_view, c10::SymIntArrayRef,
                                         const std::optional<at::Tensor>&)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(x, B, absmax, blocksize, quant_type, shapeB, bias);
}

// Backward dequantises into one buffer per thread and device (weights of up
// to 4 M elements on the CPU, 128 M on a GPU, where the caching allocator
// would otherwise hand out and take back a dense weight per layer and step;
// a GPU buffer is only reused in stream order, so that is safe) instead of
// a fresh tensor per layer. Undefined (take the op route) for traced
// (Python-dispatch) tensors, double backward, float64 and larger weights.
at::Tensor reused_weight(const at::Tensor& grad_out, const at::Tensor& B, const at::Tensor& absmax,
                         int64_t blocksize, const std::string& quant_type,
                         const std::vector<c10::SymInt>& shapeB) {
  const auto dtype = grad_out.scalar_type();
  const bool cuda = grad_out.is_cuda() && !grad_out.unsafeGetTensorImpl()->is_python_dispatch() &&
                    !grad_out.unsafeGetTensorImpl()->has_symbolic_sizes_strides();
  if (at::GradMode::is_enabled() || !(cuda || detail::is_plain_cpu_tensor(grad_out)) ||
      (dtype != at::kFloat && dtype != at::kBFloat16 && !(cuda && dtype == at::kHalf)) ||
      !shapeB[0].maybe_as_int() || !shapeB[1].maybe_as_int())
    return {};
  const int64_t max_reused = cuda ? int64_t{1} << 27 : int64_t{1} << 22;
  const int64_t N = *shapeB[0].maybe_as_int(), K = *shapeB[1].maybe_as_int();
  if (N * K > max_reused) return {};
  thread_local std::map<std::tuple<int, int, int>, at::Tensor> buffers;
  at::Tensor& buffer = buffers[{static_cast<int>(grad_out.device().type()),
                                grad_out.device().index(), static_cast<int>(dtype)}];
  if (!buffer.defined() || buffer.numel() < N * K)
    buffer = at::empty({N * K}, grad_out.options().dtype(dtype));
  at::Tensor W = buffer.narrow(0, 0, N * K).view({N, K});
  dequantize_4bit_out(W, B, absmax, blocksize, quant_type, {N, K}, dtype);
  return W;
}

// d(loss)/dx of x @ dequant(W)^T: grad_out @ dequant(W).
at::Tensor matmul_4bit_grad_input(const at::Tensor& grad_out, const at::Tensor& B,
                                  const at::Tensor& absmax, int64_t blocksize,
                                  const std::string& quant_type,
                                  const std::vector<c10::SymInt>& shapeB) {
  if (const at::Tensor W = reused_weight(grad_out, B, absmax, blocksize, quant_type, shapeB);
      W.defined())
    return detail::dense_linear(grad_out, W.t());  // oneDNN reads W^T in place
  const at::Tensor Wd = detail::dequantize_weight_as(B, absmax, blocksize, quant_type, shapeB,
                                                     grad_out.scalar_type());
  // A double backward (create_graph) needs the differentiable at::matmul.
  return at::GradMode::is_enabled() ? at::matmul(grad_out, Wd)
                                    : detail::dense_linear(grad_out, Wd.t());
}

// What both 4-bit autograd functions keep besides tensors: the weight's layout.
void save_weight_layout(torch::autograd::AutogradContext* ctx, int64_t blocksize,
                        std::string_view quant_type, c10::SymIntArrayRef shapeB,
                        const std::optional<at::Tensor>& bias) {
  ctx->saved_data["blocksize"] = blocksize;
  ctx->saved_data["quant_type"] = std::string(quant_type);
  ctx->saved_data["shapeB"] = c10::IValue(shapeB);
  ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
}

std::vector<c10::SymInt> saved_shape(torch::autograd::AutogradContext* ctx) {
  std::vector<c10::SymInt> shapeB;
  for (const auto& s : ctx->saved_data["shapeB"].toListRef()) shapeB.push_back(s.toSymInt());
  return shapeB;
}

class Matmul4bitFunction : public torch::autograd::Function<Matmul4bitFunction> {
 public:
  // `replayed`, when defined, is this very product computed earlier (the
  // recompute tape of selective checkpointing): it is returned instead of
  // being computed again, and backward is unchanged.
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& B, const at::Tensor& absmax, int64_t blocksize,
                            std::string_view quant_type, c10::SymIntArrayRef shapeB,
                            const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& replayed) {
    ctx->save_for_backward({B, absmax});
    save_weight_layout(ctx, blocksize, quant_type, shapeB, bias);
    if (replayed) return replayed->detach();
    return matmul_4bit_below_autograd(x, B, absmax, blocksize, quant_type, shapeB, bias);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    const at::Tensor& grad_out = grad_outputs[0];
    const auto saved = ctx->get_saved_variables();
    const std::vector<c10::SymInt> shapeB = saved_shape(ctx);
    at::Tensor grad_x, grad_bias;
    if (ctx->needs_input_grad(0))
      grad_x =
          matmul_4bit_grad_input(grad_out, saved[0], saved[1], ctx->saved_data["blocksize"].toInt(),
                                 ctx->saved_data["quant_type"].toStringRef(), shapeB);
    // needs_input_grad counts tensor arguments only: x, B, absmax, bias.
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(3)) {
      grad_bias = grad_out.reshape_symint({-1, shapeB[0]}).sum(0);
    }
    return {grad_x,       at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), grad_bias,    at::Tensor()};
  }
};

at::Tensor matmul_4bit_autograd(const at::Tensor& x, const at::Tensor& B, const at::Tensor& absmax,
                                int64_t blocksize, std::string_view quant_type,
                                c10::SymIntArrayRef shapeB, const std::optional<at::Tensor>& bias) {
  return Matmul4bitFunction::apply(x, B, absmax, blocksize, quant_type, shapeB, bias,
                                   std::optional<at::Tensor>());
}

at::Tensor gemm_4bit_below_autograd(const at::Tensor& A, const at::Tensor& B,
                                    c10::SymIntArrayRef shapeB, const at::Tensor& absmax,
                                    int64_t blocksize, std::string_view quant_type,
                                    const std::optional<at::Tensor>& bias,
                                    const std::optional<at::Tensor>& absmax_8bit,
                                    const std::optional<at::Tensor>& absmax_code,
                                    const std::optional<at::Tensor>& absmax_offset) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("qlora::gemm_4bit", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, c10::SymIntArrayRef,
                            const at::Tensor&, int64_t, std::string_view,
                            const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                            const std::optional<at::Tensor>&, const std::optional<at::Tensor>&)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(A, B, shapeB, absmax, blocksize, quant_type, bias, absmax_8bit, absmax_code,
                 absmax_offset);
}

// gemm_4bit is differentiable in A and bias, as matmul_4bit: backward
// undoes the double quantisation of the statistics (a pass over 1/64 of the
// weight) and takes matmul_4bit's route from there.
class Gemm4bitFunction : public torch::autograd::Function<Gemm4bitFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& A,
                            const at::Tensor& B, c10::SymIntArrayRef shapeB,
                            const at::Tensor& absmax, int64_t blocksize,
                            std::string_view quant_type, const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& absmax_8bit,
                            const std::optional<at::Tensor>& absmax_code,
                            const std::optional<at::Tensor>& absmax_offset) {
    const bool nested = absmax_8bit.has_value() && absmax_8bit->defined();
    ctx->save_for_backward({B, absmax, nested ? *absmax_8bit : at::Tensor(),
                            nested ? *absmax_code : at::Tensor(),
                            nested ? *absmax_offset : at::Tensor()});
    save_weight_layout(ctx, blocksize, quant_type, shapeB, bias);
    return gemm_4bit_below_autograd(A, B, shapeB, absmax, blocksize, quant_type, bias, absmax_8bit,
                                    absmax_code, absmax_offset);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    const at::Tensor& grad_out = grad_outputs[0];
    const auto saved = ctx->get_saved_variables();
    const std::vector<c10::SymInt> shapeB = saved_shape(ctx);
    at::Tensor grad_a, grad_bias;
    if (ctx->needs_input_grad(0)) {
      const at::Tensor scales =
          saved[2].defined() ? detail::nested_float_absmax(saved[2], saved[1], saved[3], saved[4])
                             : saved[1];
      grad_a =
          matmul_4bit_grad_input(grad_out, saved[0], scales, ctx->saved_data["blocksize"].toInt(),
                                 ctx->saved_data["quant_type"].toStringRef(), shapeB);
    }
    // needs_input_grad counts tensor arguments only: A, B, absmax, bias, ...
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(3))
      grad_bias = grad_out.reshape_symint({-1, shapeB[0]}).sum(0);
    return {grad_a,       at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), grad_bias,    at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor gemm_4bit_autograd(const at::Tensor& A, const at::Tensor& B, c10::SymIntArrayRef shapeB,
                              const at::Tensor& absmax, int64_t blocksize,
                              std::string_view quant_type, const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& absmax_8bit,
                              const std::optional<at::Tensor>& absmax_code,
                              const std::optional<at::Tensor>& absmax_offset) {
  return Gemm4bitFunction::apply(A, B, shapeB, absmax, blocksize, quant_type, bias, absmax_8bit,
                                 absmax_code, absmax_offset);
}

}  // namespace

namespace detail {

at::Tensor matmul_4bit_replay(const at::Tensor& x, const at::Tensor& B, const at::Tensor& absmax,
                              int64_t blocksize, std::string_view quant_type,
                              at::IntArrayRef shapeB, const std::optional<at::Tensor>& bias,
                              const at::Tensor& output) {
  TORCH_CHECK(output.defined() && !output.requires_grad(),
              "matmul_4bit_replay: the recorded output must be a tensor without grad");
  return Matmul4bitFunction::apply(x, B, absmax, blocksize, quant_type,
                                   c10::fromIntArrayRefSlow(shapeB), bias,
                                   std::optional<at::Tensor>(output));
}

}  // namespace detail

TORCH_LIBRARY_IMPL(qlora, Autograd, m) {
  m.impl("matmul_4bit", &matmul_4bit_autograd);
  m.impl("gemm_4bit", &gemm_4bit_autograd);
  // The quantizers are not differentiable: backpropagating through them is
  // an error that names the op, never a silent zero gradient.
  for (const char* op : {"quantize_4bit", "dequantize_4bit", "quantize_blockwise",
                         "dequantize_blockwise", "gemv_4bit"})
    m.impl(op, torch::autograd::autogradNotImplementedFallback());
}

}  // namespace qlora
