#include "ops/checks.h"

#include <vector>

#include <c10/util/Exception.h>

namespace qlora::detail {

QuantType parse_quant_type(std::string_view op, std::string_view quant_type) {
  if (quant_type == "nf4") return QuantType::kNF4;
  if (quant_type == "fp4") return QuantType::kFP4;
  TORCH_CHECK(false, "qlora::", op, ": quant_type must be \"nf4\" or \"fp4\", got \"",
              std::string(quant_type), "\"");
}

void check_blocksize(std::string_view op, int64_t blocksize) {
  const bool power_of_two = blocksize > 0 && (blocksize & (blocksize - 1)) == 0;
  TORCH_CHECK(power_of_two && blocksize >= 32 && blocksize <= 4096, "qlora::", op,
              ": blocksize must be one of 32, 64, 128, 256, 512, 1024, 2048, 4096 (as in "
              "bitsandbytes), got ",
              blocksize);
}

void check_float_dtype(std::string_view op, std::string_view what, at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, "qlora::", op,
              ": ", std::string(what), " must be float32, float16 or bfloat16, got ", dtype);
}

void check_same_device(std::string_view op, const at::Tensor& a, std::string_view a_name,
                       const at::Tensor& b, std::string_view b_name) {
  TORCH_CHECK(a.device() == b.device(), "qlora::", op, ": ", std::string(a_name), " is on ",
              a.device(), " but ", std::string(b_name), " is on ", b.device(),
              "; move them to the same device");
}

c10::SymInt checked_numel(std::string_view op, c10::SymIntArrayRef shape) {
  c10::SymInt n = 1;
  for (const auto& s : shape) {
    TORCH_CHECK(s >= 0, "qlora::", op, ": shape has a negative dimension: ", shape);
    n = n * s;
  }
  return n;
}

c10::SymInt packed_bytes(const c10::SymInt& n) { return (n + 1) / 2; }

c10::SymInt num_blocks(const c10::SymInt& n, int64_t blocksize) {
  return (n + (blocksize - 1)) / blocksize;
}

void check_quantize_4bit(const at::Tensor& A, int64_t blocksize, std::string_view quant_type,
                         at::ScalarType quant_storage) {
  constexpr std::string_view op = "quantize_4bit";
  parse_quant_type(op, quant_type);
  check_blocksize(op, blocksize);
  check_float_dtype(op, "A", A.scalar_type());
  const int64_t storage_bytes = static_cast<int64_t>(c10::elementSize(quant_storage));
  TORCH_CHECK(packed_bytes(A.sym_numel()) % storage_bytes == 0, "qlora::", op, ": ",
              packed_bytes(A.sym_numel()), " packed bytes cannot be viewed as quant_storage ",
              quant_storage, " (element size ", storage_bytes, ")");
}

c10::SymInt check_dequantize_4bit(const at::Tensor& A, const at::Tensor& absmax, int64_t blocksize,
                                  std::string_view quant_type, c10::SymIntArrayRef shape,
                                  at::ScalarType dtype) {
  constexpr std::string_view op = "dequantize_4bit";
  parse_quant_type(op, quant_type);
  check_blocksize(op, blocksize);
  check_float_dtype(op, "dtype", dtype);
  check_same_device(op, A, "A", absmax, "absmax");
  TORCH_CHECK(absmax.scalar_type() == at::kFloat, "qlora::", op, ": absmax must be float32, got ",
              absmax.scalar_type(),
              " (dequantize double-quantized statistics first: QuantState::float_absmax())");
  const c10::SymInt n = checked_numel(op, shape);
  const c10::SymInt a_bytes = A.sym_numel() * static_cast<int64_t>(A.element_size());
  TORCH_CHECK(a_bytes == packed_bytes(n), "qlora::", op, ": A holds ", a_bytes, " bytes but shape ",
              shape, " (", n, " elements) needs ", packed_bytes(n));
  TORCH_CHECK(absmax.sym_numel() == num_blocks(n, blocksize), "qlora::", op, ": absmax has ",
              absmax.sym_numel(), " elements but ", n, " elements in blocks of ", blocksize,
              " need ", num_blocks(n, blocksize));
  return n;
}

c10::SymInt check_dequantize_4bit_out(const at::Tensor& A, const at::Tensor& absmax,
                                      int64_t blocksize, std::string_view quant_type,
                                      c10::SymIntArrayRef shape, at::ScalarType dtype,
                                      const at::Tensor& out) {
  const c10::SymInt n = check_dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype);
  check_same_device("dequantize_4bit.out", A, "A", out, "out");
  TORCH_CHECK(out.scalar_type() == dtype && out.sym_sizes() == shape && out.is_contiguous(),
              "qlora::dequantize_4bit.out: out must be a contiguous ", dtype, " tensor of shape ",
              shape, ", got ", out.scalar_type(), out.sym_sizes(),
              out.is_contiguous() ? "" : " (non-contiguous)");
  return n;
}

void check_quantize_blockwise(const at::Tensor& A, const at::Tensor& code, int64_t blocksize) {
  constexpr std::string_view op = "quantize_blockwise";
  check_blocksize(op, blocksize);
  check_float_dtype(op, "A", A.scalar_type());
  check_same_device(op, A, "A", code, "code");
  TORCH_CHECK(code.scalar_type() == at::kFloat && code.dim() == 1 && code.sym_numel() == 256,
              "qlora::", op, ": code must be a float32 tensor of 256 sorted values, got ",
              code.scalar_type(), code.sym_sizes());
}

void check_dequantize_blockwise(const at::Tensor& A, const at::Tensor& absmax,
                                const at::Tensor& code, int64_t blocksize, at::ScalarType dtype) {
  constexpr std::string_view op = "dequantize_blockwise";
  check_blocksize(op, blocksize);
  check_float_dtype(op, "dtype", dtype);
  check_same_device(op, A, "A", absmax, "absmax");
  check_same_device(op, A, "A", code, "code");
  TORCH_CHECK(A.scalar_type() == at::kByte, "qlora::", op, ": A must be uint8, got ",
              A.scalar_type());
  TORCH_CHECK(absmax.scalar_type() == at::kFloat, "qlora::", op, ": absmax must be float32, got ",
              absmax.scalar_type());
  TORCH_CHECK(code.scalar_type() == at::kFloat && code.sym_numel() == 256, "qlora::", op,
              ": code must be a float32 tensor of 256 values, got ", code.scalar_type(),
              code.sym_sizes());
  TORCH_CHECK(absmax.sym_numel() == num_blocks(A.sym_numel(), blocksize), "qlora::", op,
              ": absmax has ", absmax.sym_numel(), " elements but ", A.sym_numel(),
              " codes in blocks of ", blocksize, " need ", num_blocks(A.sym_numel(), blocksize));
}

namespace {
// B's bytes against shapeB [out, in]; returns out * in.
c10::SymInt check_packed_weight(std::string_view op, const at::Tensor& B,
                                c10::SymIntArrayRef shapeB) {
  TORCH_CHECK(shapeB.size() == 2, "qlora::", op,
              ": shapeB must be [out_features, in_features], got ", shapeB);
  const c10::SymInt n = checked_numel(op, shapeB);
  const c10::SymInt b_bytes = B.sym_numel() * static_cast<int64_t>(B.element_size());
  TORCH_CHECK(b_bytes == packed_bytes(n), "qlora::", op, ": B holds ", b_bytes,
              " bytes but shapeB ", shapeB, " needs ", packed_bytes(n));
  return n;
}

void check_weight_4bit(std::string_view op, const at::Tensor& B, c10::SymIntArrayRef shapeB,
                       const at::Tensor& absmax, int64_t blocksize) {
  check_blocksize(op, blocksize);
  const c10::SymInt n = check_packed_weight(op, B, shapeB);
  TORCH_CHECK(absmax.scalar_type() == at::kFloat, "qlora::", op, ": absmax must be float32, got ",
              absmax.scalar_type(),
              " (dequantize double-quantized statistics first: QuantState::float_absmax())");
  TORCH_CHECK(absmax.sym_numel() == num_blocks(n, blocksize), "qlora::", op, ": absmax has ",
              absmax.sym_numel(), " elements but shapeB ", shapeB, " in blocks of ", blocksize,
              " needs ", num_blocks(n, blocksize));
}
}  // namespace

void check_gemv_4bit(const at::Tensor& A, const at::Tensor& B, c10::SymIntArrayRef shapeB,
                     const at::Tensor& absmax, const at::Tensor& code, int64_t blocksize) {
  constexpr std::string_view op = "gemv_4bit";
  check_weight_4bit(op, B, shapeB, absmax, blocksize);
  check_float_dtype(op, "A", A.scalar_type());
  check_same_device(op, A, "A", B, "B");
  check_same_device(op, A, "A", absmax, "absmax");
  check_same_device(op, A, "A", code, "code");
  TORCH_CHECK(A.dim() >= 1 && A.sym_size(-1) == shapeB[1], "qlora::", op, ": A's last dimension (",
              A.dim() ? A.sym_size(-1) : c10::SymInt(0),
              ") must equal in_features shapeB[1] = ", shapeB[1]);
  TORCH_CHECK(code.scalar_type() == at::kFloat && code.sym_numel() == 16, "qlora::", op,
              ": code must be the float32 16-entry 4-bit table, got ", code.scalar_type(),
              code.sym_sizes());
}

namespace {
// `out` of an .out overload: the shape, dtype and device the functional op
// would return, contiguous (the kernels write it linearly).
void check_out(std::string_view op, const at::Tensor& out, c10::SymIntArrayRef shape,
               at::ScalarType dtype, const at::Tensor& like) {
  TORCH_CHECK(out.sym_sizes() == shape, "qlora::", op, ".out: out must have shape ", shape,
              ", got ", out.sym_sizes());
  TORCH_CHECK(out.scalar_type() == dtype, "qlora::", op, ".out: out must be ", dtype, ", got ",
              out.scalar_type());
  check_same_device(op, like, "A", out, "out");
  TORCH_CHECK(out.is_contiguous(), "qlora::", op, ".out: out must be contiguous");
}
}  // namespace

void check_gemv_4bit_out(const at::Tensor& A, const at::Tensor& B, c10::SymIntArrayRef shapeB,
                         const at::Tensor& absmax, const at::Tensor& code, int64_t blocksize,
                         const at::Tensor& out) {
  check_gemv_4bit(A, B, shapeB, absmax, code, blocksize);
  std::vector<c10::SymInt> shape(A.sym_sizes().begin(), A.sym_sizes().end() - 1);
  shape.push_back(shapeB[0]);
  check_out("gemv_4bit", out, shape, A.scalar_type(), A);
}

void check_dequantize_blockwise_out(const at::Tensor& A, const at::Tensor& absmax,
                                    const at::Tensor& code, int64_t blocksize, at::ScalarType dtype,
                                    const at::Tensor& out) {
  check_dequantize_blockwise(A, absmax, code, blocksize, dtype);
  check_out("dequantize_blockwise", out, A.sym_sizes(), dtype, A);
}

void check_gemm_4bit(const at::Tensor& A, const at::Tensor& B, c10::SymIntArrayRef shapeB,
                     const at::Tensor& absmax, int64_t blocksize, std::string_view quant_type,
                     const std::optional<at::Tensor>& bias,
                     const std::optional<at::Tensor>& absmax_8bit,
                     const std::optional<at::Tensor>& absmax_code,
                     const std::optional<at::Tensor>& absmax_offset) {
  constexpr std::string_view op = "gemm_4bit";
  parse_quant_type(op, quant_type);
  check_blocksize(op, blocksize);
  check_float_dtype(op, "A", A.scalar_type());
  check_same_device(op, A, "A", B, "B");
  check_same_device(op, A, "A", absmax, "absmax");
  const c10::SymInt n = check_packed_weight(op, B, shapeB);
  TORCH_CHECK(A.dim() >= 1 && A.sym_size(-1) == shapeB[1], "qlora::", op, ": A's last dimension (",
              A.dim() ? A.sym_size(-1) : c10::SymInt(0),
              ") must equal in_features shapeB[1] = ", shapeB[1]);
  TORCH_CHECK(absmax.scalar_type() == at::kFloat, "qlora::", op, ": absmax must be float32, got ",
              absmax.scalar_type());
  const c10::SymInt blocks = num_blocks(n, blocksize);
  if (absmax_8bit.has_value() && absmax_8bit->defined()) {
    const at::Tensor& q = *absmax_8bit;
    TORCH_CHECK(q.dim() == 1 && q.scalar_type() == at::kByte, "qlora::", op,
                ": absmax_8bit must be a 1-D uint8 tensor, got ", q.scalar_type(), q.sym_sizes());
    check_same_device(op, A, "A", q, "absmax_8bit");
    TORCH_CHECK(q.sym_numel() == blocks, "qlora::", op, ": absmax_8bit has ", q.sym_numel(),
                " elements but shapeB ", shapeB, " in blocks of ", blocksize, " needs ", blocks);
    TORCH_CHECK(absmax.sym_numel() == num_blocks(blocks, 256), "qlora::", op,
                ": with absmax_8bit, absmax holds the nested absmax of blocks of 256 statistics: ",
                num_blocks(blocks, 256), " elements expected, got ", absmax.sym_numel());
    TORCH_CHECK(absmax_code.has_value() && absmax_code->defined(), "qlora::", op,
                ": absmax_code is required with absmax_8bit");
    const at::Tensor& c = *absmax_code;
    TORCH_CHECK(c.dim() == 1 && c.scalar_type() == at::kFloat && c.sym_numel() == 256,
                "qlora::", op, ": absmax_code must be a float32 tensor of 256 values, got ",
                c.scalar_type(), c.sym_sizes());
    check_same_device(op, A, "A", c, "absmax_code");
    TORCH_CHECK(absmax_offset.has_value() && absmax_offset->defined(), "qlora::", op,
                ": absmax_offset is required with absmax_8bit");
    const at::Tensor& o = *absmax_offset;
    TORCH_CHECK(o.dim() == 0 && o.scalar_type() == at::kFloat, "qlora::", op,
                ": absmax_offset must be a 0-dim float32 tensor, got ", o.scalar_type(),
                o.sym_sizes());
  } else {
    TORCH_CHECK(absmax.sym_numel() == blocks, "qlora::", op, ": absmax has ", absmax.sym_numel(),
                " elements but shapeB ", shapeB, " in blocks of ", blocksize, " needs ", blocks);
  }
  if (bias.has_value() && bias->defined()) {
    check_same_device(op, A, "A", *bias, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->sym_size(0) == shapeB[0], "qlora::", op,
                ": bias must have shape [", shapeB[0], "], got ", bias->sym_sizes());
    TORCH_CHECK(bias->scalar_type() == A.scalar_type(), "qlora::", op, ": bias dtype (",
                bias->scalar_type(), ") must match A's (", A.scalar_type(), ")");
  }
}

void check_matmul_4bit(const at::Tensor& x, const at::Tensor& B, const at::Tensor& absmax,
                       int64_t blocksize, std::string_view quant_type, c10::SymIntArrayRef shapeB,
                       const std::optional<at::Tensor>& bias) {
  constexpr std::string_view op = "matmul_4bit";
  parse_quant_type(op, quant_type);
  check_weight_4bit(op, B, shapeB, absmax, blocksize);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf ||
                  x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kDouble,
              "qlora::matmul_4bit: x must be float32, float16, bfloat16 or float64, got ",
              x.scalar_type());
  check_same_device(op, x, "x", B, "B");
  check_same_device(op, x, "x", absmax, "absmax");
  TORCH_CHECK(x.dim() >= 1 && x.sym_size(-1) == shapeB[1], "qlora::", op, ": x's last dimension (",
              x.dim() ? x.sym_size(-1) : c10::SymInt(0),
              ") must equal in_features shapeB[1] = ", shapeB[1]);
  if (bias.has_value() && bias->defined()) {
    check_same_device(op, x, "x", *bias, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->sym_size(0) == shapeB[0], "qlora::", op,
                ": bias must have shape [", shapeB[0], "], got ", bias->sym_sizes());
  }
}

void fail_non_finite(std::string_view op, int64_t block, int64_t blocksize) {
  TORCH_CHECK(false, "qlora::", op, ": input holds inf or NaN in block ", block, " (elements ",
              block * blocksize, "..", (block + 1) * blocksize - 1,
              "); blockwise quantization needs finite values");
}

void check_hash_dropout(const at::Tensor& input, double p) {
  TORCH_CHECK(p >= 0 && p < 1, "qlora::hash_dropout: p must be in [0, 1), got ", p);
  TORCH_CHECK(at::isFloatingType(input.scalar_type()),
              "qlora::hash_dropout: input must be a floating-point tensor, got ",
              input.scalar_type());
}

}  // namespace qlora::detail
