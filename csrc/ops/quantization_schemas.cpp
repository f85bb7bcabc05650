// Schemas of the qlora quantization ops. They mirror torch.ops.bitsandbytes.*
// so code written against one library runs on the other; kernels live in
// csrc/cpu, csrc/cuda and csrc/meta, autograd in csrc/autograd.
#include <torch/library.h>

TORCH_LIBRARY(qlora, m) {
  m.def(
      "quantize_4bit(Tensor A, int blocksize, str quant_type, ScalarType quant_storage) -> "
      "(Tensor, Tensor)");
  m.def(
      "dequantize_4bit(Tensor A, Tensor absmax, int blocksize, str quant_type, SymInt[] shape, "
      "ScalarType dtype) -> Tensor");
  m.def(
      "dequantize_4bit.out(Tensor A, Tensor absmax, int blocksize, str quant_type, SymInt[] shape, "
      "ScalarType dtype, Tensor(a!) out) -> ()");
  m.def("quantize_blockwise(Tensor A, Tensor code, int blocksize) -> (Tensor, Tensor)");
  m.def(
      "dequantize_blockwise(Tensor A, Tensor absmax, Tensor code, int blocksize, ScalarType dtype) "
      "-> Tensor");
  m.def(
      "dequantize_blockwise.out(Tensor A, Tensor absmax, Tensor code, int blocksize, ScalarType "
      "dtype, Tensor! out) -> ()");
  m.def(
      "gemv_4bit(Tensor A, Tensor B, SymInt[] shapeB, Tensor absmax, Tensor code, int blocksize) "
      "-> Tensor");
  m.def(
      "gemv_4bit.out(Tensor A, Tensor B, SymInt[] shapeB, Tensor absmax, Tensor code, int "
      "blocksize, Tensor! out) -> ()");
  // The 4-bit GEMM that reads double-quantised statistics directly (absmax
  // then holds the nested absmax of blocks of 256 first-level statistics).
  m.def(
      "gemm_4bit(Tensor A, Tensor B, SymInt[] shapeB, Tensor absmax, int blocksize, str "
      "quant_type, Tensor? bias=None, Tensor? absmax_8bit=None, Tensor? absmax_code=None, "
      "Tensor? absmax_offset=None) -> Tensor");
  m.def(
      "matmul_4bit(Tensor x, Tensor B, Tensor absmax, int blocksize, str quant_type, SymInt[] "
      "shapeB, Tensor? bias=None) -> Tensor");
}
