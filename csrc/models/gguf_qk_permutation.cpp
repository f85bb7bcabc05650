// llama.cpp's row order for Q/K projections, a property of the llama family's
// GGUF binding, not of the GGUF container.
#include "qlora/models/gguf_qk_permutation.h"

#include <stdexcept>
#include <string>
#include <vector>

namespace qlora::models {

namespace {

void check_qk_rows(const at::Tensor& w, int64_t n_head, const char* fn) {
  if (!w.defined() || w.dim() < 1) {
    throw std::invalid_argument(std::string(fn) +
                                ": expected a tensor with at least one dimension");
  }
  if (n_head <= 0) {
    throw std::invalid_argument(std::string(fn) + ": n_head must be positive, got " +
                                std::to_string(n_head));
  }
  if (w.size(0) % (2 * n_head) != 0) {
    throw std::invalid_argument(
        std::string(fn) + ": dim 0 has " + std::to_string(w.size(0)) +
        " rows, not a multiple of 2 * n_head = " + std::to_string(2 * n_head));
  }
}

// Views dim 0 as [n_head, a, b] (a * b = head_dim), swaps a and b, and
// copies into the original shape. clone() guarantees a new tensor even when
// the swap is a no-op (head_dim 2).
at::Tensor swap_head_halves(const at::Tensor& w, int64_t n_head, int64_t a, int64_t b) {
  std::vector<int64_t> split = {n_head, a, b};
  for (int64_t d = 1; d < w.dim(); ++d) split.push_back(w.size(d));
  return w.reshape(split).transpose(1, 2).clone(at::MemoryFormat::Contiguous).view(w.sizes());
}

}  // namespace

at::Tensor apply_llama_qk_permutation(const at::Tensor& w, int64_t n_head) {
  check_qk_rows(w, n_head, "apply_llama_qk_permutation");
  const int64_t head_dim = w.size(0) / n_head;
  // HF rows (h, j, i) -> GGUF rows (h, i, j): new[h*hd + 2i + j] = old[h*hd + j*hd/2 + i].
  return swap_head_halves(w, n_head, 2, head_dim / 2);
}

at::Tensor reverse_llama_qk_permutation(const at::Tensor& w, int64_t n_head) {
  check_qk_rows(w, n_head, "reverse_llama_qk_permutation");
  const int64_t head_dim = w.size(0) / n_head;
  return swap_head_halves(w, n_head, head_dim / 2, 2);
}

}  // namespace qlora::models
