// Schemas of the ggml-block ops: a frozen base weight kept in a GGUF
// tensor's own blocks (Q4_0 ... Q6_K, common/ggml_blocks.h), never
// re-quantised. The family of matmul_4bit: the blocks are a uint8 tensor of
// the stored bytes ([out, in / block_size * type_size]), `ggml_type` names
// their type as ggml does ("Q4_K"), `shape` is the logical [out, in].
// Kernels: cpu/ggml_kernels.cpp, meta/ggml_meta.cpp; autograd:
// autograd/ggml_matmul_autograd.cpp.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(qlora, m) {
  // The weight in `dtype`, computed in float32 exactly as ggml's reference
  // dequantize_row_* functions do, then rounded once.
  m.def(
      "ggml_dequantize(Tensor blocks, str ggml_type, SymInt[] shape, ScalarType dtype) -> Tensor");
  // x @ dequant(W)^T + bias, differentiable in x and bias.
  m.def(
      "ggml_matmul(Tensor x, Tensor blocks, str ggml_type, SymInt[] shape, Tensor? bias=None) -> "
      "Tensor");
}
