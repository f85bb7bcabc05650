// Public C++ API of the quantization ops: thin wrappers that call the
// registered torch.ops.qlora.* operators through the dispatcher, so C++
// callers get the same CPU/CUDA/Meta/autograd behaviour as Python callers.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/core/SymInt.h>
#include <c10/util/ArrayRef.h>
#include <optional>
#include <string_view>

#include <tuple>

namespace qlora {

// 4-bit blockwise quantization in bitsandbytes' layout: returns the packed
// codes ((numel+1)/2 bytes as a [k, 1] tensor of quant_storage) and the
// float32 absmax of every block.
std::tuple<at::Tensor, at::Tensor> quantize_4bit(const at::Tensor& A, int64_t blocksize,
                                                 std::string_view quant_type,
                                                 at::ScalarType quant_storage = at::kByte);

at::Tensor dequantize_4bit(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                           std::string_view quant_type, at::IntArrayRef shape,
                           at::ScalarType dtype);

// Writes dequant(packed) into `out` (contiguous, of `shape` and `dtype`), so
// hot loops can reuse one buffer instead of allocating per call.
void dequantize_4bit_out(at::Tensor& out, const at::Tensor& packed, const at::Tensor& absmax,
                         int64_t blocksize, std::string_view quant_type, at::IntArrayRef shape,
                         at::ScalarType dtype);

// The same with symbolic sizes (for code that runs under torch.compile).
at::Tensor dequantize_4bit_symint(const at::Tensor& packed, const at::Tensor& absmax,
                                  int64_t blocksize, std::string_view quant_type,
                                  c10::SymIntArrayRef shape, at::ScalarType dtype);

// 8-bit blockwise quantization against a 256-entry code (the dynamic map).
std::tuple<at::Tensor, at::Tensor> quantize_blockwise(const at::Tensor& A, const at::Tensor& code,
                                                      int64_t blocksize);
at::Tensor dequantize_blockwise(const at::Tensor& A, const at::Tensor& absmax,
                                const at::Tensor& code, int64_t blocksize, at::ScalarType dtype);

// A @ dequant(B)^T for inputs with a single row (batch-1 decoding); products
// in the input dtype, accumulation in float32. `code` is the 16-entry table.
at::Tensor gemv_4bit(const at::Tensor& A, const at::Tensor& B, at::IntArrayRef shapeB,
                     const at::Tensor& absmax, const at::Tensor& code, int64_t blocksize);

// gemv_4bit into a preallocated `out` of A's dtype and shape [..., shapeB[0]].
void gemv_4bit_out(at::Tensor& out, const at::Tensor& A, const at::Tensor& B,
                   at::IntArrayRef shapeB, const at::Tensor& absmax, const at::Tensor& code,
                   int64_t blocksize);

// dequantize_blockwise into a preallocated contiguous `out` of A's shape.
void dequantize_blockwise_out(at::Tensor& out, const at::Tensor& A, const at::Tensor& absmax,
                              const at::Tensor& code, int64_t blocksize, at::ScalarType dtype);

// Double-quantised statistics of a 4-bit weight, as gemm_4bit takes them:
// the 8-bit codes of each block's absmax, the nested absmax (one per 256
// blocks), the 256-entry code and the offset (a 0-dim float32 tensor).
struct NestedAbsmax {
  at::Tensor absmax_8bit, nested_absmax, code, offset;
};

// A @ dequant(B)^T + bias, bitsandbytes' gemm_4bit: with `nested` the block
// statistics are read double-quantised (CUDA fuses undoing that into the
// dequantisation). Differentiable w.r.t. A and bias. Without `nested`,
// `absmax` is the float32 per-block absmax.
at::Tensor gemm_4bit(const at::Tensor& A, const at::Tensor& B, at::IntArrayRef shapeB,
                     const at::Tensor& absmax, int64_t blocksize, std::string_view quant_type,
                     const std::optional<at::Tensor>& bias = std::nullopt);
at::Tensor gemm_4bit(const at::Tensor& A, const at::Tensor& B, at::IntArrayRef shapeB,
                     const NestedAbsmax& nested, int64_t blocksize, std::string_view quant_type,
                     const std::optional<at::Tensor>& bias = std::nullopt);

// Fused Adam(W) updates in place of p and its states, bitsandbytes' ops
// (optimizer_name "adam" or "adamw": decoupled weight decay). Gradient
// elements that are inf/NaN (or 0 with skip_zeros) leave their parameter and
// state elements unchanged. 32-bit: float32 states exp_avg, exp_avg_sq.
struct AdamStepArgs {
  double lr = 1e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0;
  int64_t step = 1;  // counts from 1 (bias correction)
  double gnorm_scale = 1;
  bool skip_zeros = false;
};
void optimizer_update_32bit(at::Tensor& g, at::Tensor& p, at::Tensor& exp_avg,
                            at::Tensor& exp_avg_sq, const AdamStepArgs& args);
// 8-bit blockwise: uint8 codes in blocks of 256 against the signed (qmap1)
// and unsigned (qmap2) dynamic maps, with their float32 absmax per block.
void optimizer_update_8bit_blockwise(at::Tensor& g, at::Tensor& p, at::Tensor& state1,
                                     at::Tensor& state2, at::Tensor& qmap1, at::Tensor& qmap2,
                                     at::Tensor& absmax1, at::Tensor& absmax2,
                                     const AdamStepArgs& args);

// x @ dequant(W)^T + bias, differentiable w.r.t. x and bias (W is frozen).
// `shape` is W's logical [out, in] shape; absmax is float32 (dequantize
// double-quantized statistics first, see QuantState::float_absmax()).
at::Tensor matmul_4bit(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                       int64_t blocksize, std::string_view quant_type, at::IntArrayRef shape,
                       const std::optional<at::Tensor>& bias = std::nullopt);

// Inverted dropout whose mask is a function of (seed, element index): the
// same seed drops the same elements on every device and in every call, so
// backward and recomputation need no mask tensor. p in [0, 1).
at::Tensor hash_dropout(const at::Tensor& input, double p, int64_t seed);

// A weight kept in a GGUF tensor's own ggml blocks (F32, F16, BF16, Q4_0,
// Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K), never re-quantised: `blocks` is
// a uint8 tensor of the stored bytes, `ggml_type` ggml's name of their type
// ("Q4_K"), `shape` the logical [out, in] (in a multiple of the block size).
// The float32 values are bit-identical to ggml's and gguf-py's
// dequantisation, then rounded once to `dtype`.
at::Tensor ggml_dequantize(const at::Tensor& blocks, std::string_view ggml_type,
                           at::IntArrayRef shape, at::ScalarType dtype);
at::Tensor ggml_dequantize_symint(const at::Tensor& blocks, std::string_view ggml_type,
                                  c10::SymIntArrayRef shape, at::ScalarType dtype);

// x @ ggml_dequantize(W)^T + bias, differentiable w.r.t. x and bias (the
// blocks are frozen), with matmul_4bit's numerics: weights rounded to x's
// dtype, float32 accumulation.
at::Tensor ggml_matmul(const at::Tensor& x, const at::Tensor& blocks, std::string_view ggml_type,
                       at::IntArrayRef shape, const std::optional<at::Tensor>& bias = std::nullopt);

}  // namespace qlora
