// The public C++ API (include/qlora/ops.h): typed dispatcher calls, so C++
// callers get exactly what torch.ops.qlora.* gives Python callers.
#include <ATen/core/dispatch/Dispatcher.h>

#include "qlora/ops.h"

namespace qlora {
namespace {

template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> quantize_4bit(const at::Tensor& A, int64_t blocksize,
                                                 std::string_view quant_type,
                                                 at::ScalarType quant_storage) {
  static auto op = op_handle<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, int64_t, std::string_view, at::ScalarType)>("qlora::quantize_4bit");
  return op.call(A, blocksize, quant_type, quant_storage);
}

at::Tensor dequantize_4bit_symint(const at::Tensor& packed, const at::Tensor& absmax,
                                  int64_t blocksize, std::string_view quant_type,
                                  c10::SymIntArrayRef shape, at::ScalarType dtype) {
  static auto op =
      op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, std::string_view,
                           c10::SymIntArrayRef, at::ScalarType)>("qlora::dequantize_4bit");
  return op.call(packed, absmax, blocksize, quant_type, shape, dtype);
}

at::Tensor dequantize_4bit(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                           std::string_view quant_type, at::IntArrayRef shape,
                           at::ScalarType dtype) {
  return dequantize_4bit_symint(packed, absmax, blocksize, quant_type,
                                c10::fromIntArrayRefSlow(shape), dtype);
}

void dequantize_4bit_out(at::Tensor& out, const at::Tensor& packed, const at::Tensor& absmax,
                         int64_t blocksize, std::string_view quant_type, at::IntArrayRef shape,
                         at::ScalarType dtype) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("qlora::dequantize_4bit", "out")
                       .typed<void(const at::Tensor&, const at::Tensor&, int64_t, std::string_view,
                                   c10::SymIntArrayRef, at::ScalarType, at::Tensor&)>();
  op.call(packed, absmax, blocksize, quant_type, c10::fromIntArrayRefSlow(shape), dtype, out);
}

std::tuple<at::Tensor, at::Tensor> quantize_blockwise(const at::Tensor& A, const at::Tensor& code,
                                                      int64_t blocksize) {
  static auto op =
      op_handle<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, int64_t)>(
          "qlora::quantize_blockwise");
  return op.call(A, code, blocksize);
}

at::Tensor dequantize_blockwise(const at::Tensor& A, const at::Tensor& absmax,
                                const at::Tensor& code, int64_t blocksize, at::ScalarType dtype) {
  static auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                        int64_t, at::ScalarType)>("qlora::dequantize_blockwise");
  return op.call(A, absmax, code, blocksize, dtype);
}

at::Tensor gemv_4bit(const at::Tensor& A, const at::Tensor& B, at::IntArrayRef shapeB,
                     const at::Tensor& absmax, const at::Tensor& code, int64_t blocksize) {
  static auto op =
      op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, c10::SymIntArrayRef,
                           const at::Tensor&, const at::Tensor&, int64_t)>("qlora::gemv_4bit");
  return op.call(A, B, c10::fromIntArrayRefSlow(shapeB), absmax, code, blocksize);
}

at::Tensor matmul_4bit(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                       int64_t blocksize, std::string_view quant_type, at::IntArrayRef shape,
                       const std::optional<at::Tensor>& bias) {
  static auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                        int64_t, std::string_view, c10::SymIntArrayRef,
                                        const std::optional<at::Tensor>&)>("qlora::matmul_4bit");
  return op.call(x, packed, absmax, blocksize, quant_type, c10::fromIntArrayRefSlow(shape), bias);
}

void gemv_4bit_out(at::Tensor& out, const at::Tensor& A, const at::Tensor& B,
                   at::IntArrayRef shapeB, const at::Tensor& absmax, const at::Tensor& code,
                   int64_t blocksize) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("qlora::gemv_4bit", "out")
                       .typed<void(const at::Tensor&, const at::Tensor&, c10::SymIntArrayRef,
                                   const at::Tensor&, const at::Tensor&, int64_t, at::Tensor&)>();
  op.call(A, B, c10::fromIntArrayRefSlow(shapeB), absmax, code, blocksize, out);
}

void dequantize_blockwise_out(at::Tensor& out, const at::Tensor& A, const at::Tensor& absmax,
                              const at::Tensor& code, int64_t blocksize, at::ScalarType dtype) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("qlora::dequantize_blockwise", "out")
                       .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                   at::ScalarType, at::Tensor&)>();
  op.call(A, absmax, code, blocksize, dtype, out);
}

namespace {
at::Tensor call_gemm_4bit(const at::Tensor& A, const at::Tensor& B, at::IntArrayRef shapeB,
                          const at::Tensor& absmax, int64_t blocksize, std::string_view quant_type,
                          const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& absmax_8bit,
                          const std::optional<at::Tensor>& absmax_code,
                          const std::optional<at::Tensor>& absmax_offset) {
  using Opt = const std::optional<at::Tensor>&;
  static auto op =
      op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, c10::SymIntArrayRef,
                           const at::Tensor&, int64_t, std::string_view, Opt, Opt, Opt, Opt)>(
          "qlora::gemm_4bit");
  return op.call(A, B, c10::fromIntArrayRefSlow(shapeB), absmax, blocksize, quant_type, bias,
                 absmax_8bit, absmax_code, absmax_offset);
}
}  // namespace

at::Tensor gemm_4bit(const at::Tensor& A, const at::Tensor& B, at::IntArrayRef shapeB,
                     const at::Tensor& absmax, int64_t blocksize, std::string_view quant_type,
                     const std::optional<at::Tensor>& bias) {
  return call_gemm_4bit(A, B, shapeB, absmax, blocksize, quant_type, bias, std::nullopt,
                        std::nullopt, std::nullopt);
}

at::Tensor gemm_4bit(const at::Tensor& A, const at::Tensor& B, at::IntArrayRef shapeB,
                     const NestedAbsmax& nested, int64_t blocksize, std::string_view quant_type,
                     const std::optional<at::Tensor>& bias) {
  return call_gemm_4bit(A, B, shapeB, nested.nested_absmax, blocksize, quant_type, bias,
                        nested.absmax_8bit, nested.code, nested.offset);
}

void optimizer_update_32bit(at::Tensor& g, at::Tensor& p, at::Tensor& exp_avg,
                            at::Tensor& exp_avg_sq, const AdamStepArgs& a) {
  using Opt = const std::optional<at::Tensor>&;
  static auto op = op_handle<void(std::string_view, at::Tensor&, at::Tensor&, at::Tensor&, Opt, Opt,
                                  double, double, double, double, double, double, double, double,
                                  int64_t, double, double, bool)>("qlora::optimizer_update_32bit");
  op.call("adam", g, p, exp_avg, exp_avg_sq, std::nullopt, 0.0, 0.0, a.beta1, a.beta2, 0.0, 0.0,
          a.eps, a.weight_decay, a.step, a.lr, a.gnorm_scale, a.skip_zeros);
}

void optimizer_update_8bit_blockwise(at::Tensor& g, at::Tensor& p, at::Tensor& state1,
                                     at::Tensor& state2, at::Tensor& qmap1, at::Tensor& qmap2,
                                     at::Tensor& absmax1, at::Tensor& absmax2,
                                     const AdamStepArgs& a) {
  using Opt = const std::optional<at::Tensor>&;
  static auto op =
      op_handle<void(std::string_view, at::Tensor&, at::Tensor&, at::Tensor&, Opt, double, double,
                     double, double, double, int64_t, double, at::Tensor&, Opt, at::Tensor&, Opt,
                     double, double, bool)>("qlora::optimizer_update_8bit_blockwise");
  op.call("adam", g, p, state1, state2, a.beta1, a.beta2, 0.0, 0.0, a.eps, a.step, a.lr, qmap1,
          qmap2, absmax1, absmax2, a.weight_decay, a.gnorm_scale, a.skip_zeros);
}

at::Tensor hash_dropout(const at::Tensor& input, double p, int64_t seed) {
  static auto op = op_handle<at::Tensor(const at::Tensor&, double, int64_t)>("qlora::hash_dropout");
  return op.call(input, p, seed);
}

at::Tensor ggml_dequantize_symint(const at::Tensor& blocks, std::string_view ggml_type,
                                  c10::SymIntArrayRef shape, at::ScalarType dtype) {
  static auto op = op_handle<at::Tensor(const at::Tensor&, std::string_view, c10::SymIntArrayRef,
                                        at::ScalarType)>("qlora::ggml_dequantize");
  return op.call(blocks, ggml_type, shape, dtype);
}

at::Tensor ggml_dequantize(const at::Tensor& blocks, std::string_view ggml_type,
                           at::IntArrayRef shape, at::ScalarType dtype) {
  return ggml_dequantize_symint(blocks, ggml_type, c10::fromIntArrayRefSlow(shape), dtype);
}

at::Tensor ggml_matmul(const at::Tensor& x, const at::Tensor& blocks, std::string_view ggml_type,
                       at::IntArrayRef shape, const std::optional<at::Tensor>& bias) {
  static auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, std::string_view,
                                        c10::SymIntArrayRef, const std::optional<at::Tensor>&)>(
      "qlora::ggml_matmul");
  return op.call(x, blocks, ggml_type, c10::fromIntArrayRefSlow(shape), bias);
}

}  // namespace qlora
