#include "io/ggml_quant.h"

#include "io/ggml_kquants.h"
#include "io/ggml_legacy_quants.h"

#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>

namespace qlora::io::detail {

namespace {

constexpr int64_t kQK = 32;  // elements per Q4_0 block

void put_u16(uint8_t* dst, uint16_t v) {
  dst[0] = static_cast<uint8_t>(v & 0xff);
  dst[1] = static_cast<uint8_t>(v >> 8);
}

// quantize_row_q4_0_ref: d = max / -8 (max: the value of largest magnitude,
// the first one on ties), q = min(15, (int8)(x * (1 / d) + 8.5)); element j
// in the low nibble of byte j, element j + 16 in its high nibble.
void quantize_block_q4_0(const float* x, uint8_t* y) {
  float amax = 0.0f;
  float max = 0.0f;
  for (int64_t j = 0; j < kQK; ++j) {
    const float v = x[j];
    if (amax < std::fabs(v)) {
      amax = std::fabs(v);
      max = v;
    }
  }
  const float d = max / -8.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  put_u16(y, fp32_to_fp16(d));
  for (int64_t j = 0; j < kQK / 2; ++j) {
    const float x0 = x[j] * id;
    const float x1 = x[kQK / 2 + j] * id;
    const int xi0 = std::min(15, static_cast<int>(static_cast<int8_t>(x0 + 8.5f)));
    const int xi1 = std::min(15, static_cast<int>(static_cast<int8_t>(x1 + 8.5f)));
    y[2 + j] = static_cast<uint8_t>(xi0 | (xi1 << 4));
  }
}

}  // namespace

uint16_t fp32_to_fp16(float x) { return c10::Half(x).x; }  // IEEE, round to nearest even

uint16_t fp32_to_bf16(float x) {
  uint32_t u = 0;
  std::memcpy(&u, &x, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 64);  // quiet NaN
  return static_cast<uint16_t>((u + (0x7fffu + ((u >> 16) & 1u))) >> 16);
}

bool ggml_can_quantize(GgmlType type) {
  switch (type) {
    case GgmlType::F32:
    case GgmlType::F16:
    case GgmlType::BF16:
    case GgmlType::Q8_0:
    case GgmlType::Q4_0:
    case GgmlType::Q4_1:
    case GgmlType::Q5_0:
    case GgmlType::Q5_1:
    case GgmlType::Q4_K:
    case GgmlType::Q5_K:
    case GgmlType::Q6_K:
      return true;
    default:
      return false;
  }
}

std::vector<uint8_t> quantize_ggml(GgmlType type, const float* src, int64_t numel,
                                   int64_t row_length, const std::string& name) {
  if (!ggml_can_quantize(type)) {
    throw GgufError("GGUF writer: tensor '" + name + "': cannot quantise to " +
                    ggml_type_name(type) +
                    " (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K)");
  }
  const GgmlTypeTraits& traits = ggml_type_traits(type);
  if (row_length <= 0 || numel % row_length != 0) {
    throw GgufError("GGUF writer: tensor '" + name + "': " + std::to_string(numel) +
                    " elements are not whole rows of " + std::to_string(row_length));
  }
  if (row_length % traits.block_size != 0) {
    throw GgufError("GGUF writer: tensor '" + name + "': row length " + std::to_string(row_length) +
                    " is not a multiple of " + traits.name + "'s block size " +
                    std::to_string(traits.block_size));
  }
  const int64_t n_blocks = numel / traits.block_size;
  std::vector<uint8_t> out(static_cast<size_t>(n_blocks * traits.type_size));
  uint8_t* dst = out.data();
  at::parallel_for(0, n_blocks, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const float* x = src + b * traits.block_size;
      uint8_t* y = dst + b * traits.type_size;
      switch (type) {
        case GgmlType::F32:
          std::memcpy(y, x, sizeof(float));
          break;
        case GgmlType::F16:
          put_u16(y, fp32_to_fp16(*x));
          break;
        case GgmlType::BF16:
          put_u16(y, fp32_to_bf16(*x));
          break;
        case GgmlType::Q8_0:
          quantize_q8_0(x, 1, y);
          break;
        case GgmlType::Q4_1:
          quantize_q4_1(x, 1, y);
          break;
        case GgmlType::Q5_0:
          quantize_q5_0(x, 1, y);
          break;
        case GgmlType::Q5_1:
          quantize_q5_1(x, 1, y);
          break;
        case GgmlType::Q4_0:
          quantize_block_q4_0(x, y);
          break;
        case GgmlType::Q4_K:
          quantize_q4_k(x, 1, y);
          break;
        case GgmlType::Q5_K:
          quantize_q5_k(x, 1, y);
          break;
        case GgmlType::Q6_K:
          quantize_q6_k(x, 1, y);
          break;
        default:
          break;
      }
    }
  });
  return out;
}

}  // namespace qlora::io::detail
