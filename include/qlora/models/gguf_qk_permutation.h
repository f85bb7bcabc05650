// The Q/K row permutation llama.cpp applies to LLaMA attention weights.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace qlora::models {

// llama.cpp's convert script reorders the rows of HF q_proj / k_proj
// weights (and of a LoRA B for them) so that rotary pairs are adjacent:
// within each head of head_dim rows, new[h*hd + 2*i + j] = old[h*hd +
// j*(hd/2) + i] for i < hd/2, j in {0, 1}. `n_head` is the number of heads
// the rows hold (head_count for Q, head_count_kv for K). Works on dim 0 of a
// tensor of any rank >= 1 (weights, biases, LoRA B) on any device and
// returns a new contiguous tensor; throws std::invalid_argument unless n_head > 0 and
// size(0) is a multiple of 2 * n_head.
at::Tensor apply_llama_qk_permutation(const at::Tensor& w, int64_t n_head);
// The inverse: GGUF attn_q / attn_k rows back to the HF layout.
at::Tensor reverse_llama_qk_permutation(const at::Tensor& w, int64_t n_head);

}  // namespace qlora::models
