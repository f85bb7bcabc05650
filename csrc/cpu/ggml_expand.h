// The body of every level's `ggml_expand` (isa_kernels.h): the shared block
// decoders of common/ggml_blocks.h, then one rounding to the output kind.
// Each level instantiates it inside a function carrying its own target
// attribute, where the forced-inline decoders are vectorised for that
// level; the arithmetic is the same everywhere (no FP contraction), so
// every level is bit-identical to the portable one.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "common/ggml_blocks.h"
#include "cpu/isa_kernels.h"

namespace qlora::cpu {

template <Expand kKind>
inline __attribute__((always_inline)) void ggml_expand_as(detail::GgmlCode code, const uint8_t* src,
                                                          int64_t blocks, int32_t block_size,
                                                          int32_t type_size, void* dst) {
  if constexpr (kKind == Expand::kF32) {
    detail::ggml_decode_blocks(code, src, blocks, static_cast<float*>(dst));
  } else {
    // 256 elements (one K-quant block, eight of the 32-element types) at a
    // time through a float32 tile.
    constexpr int64_t kTile = 256;
    const int64_t per_tile = kTile / block_size;
    float tile[kTile];
    for (int64_t b = 0; b < blocks; b += per_tile) {
      const int64_t nb = blocks - b < per_tile ? blocks - b : per_tile;
      detail::ggml_decode_blocks(code, src + b * type_size, nb, tile);
      const int64_t n = nb * block_size, first = b * block_size;
      for (int64_t i = 0; i < n; ++i) {
        if constexpr (kKind == Expand::kBF16) {
          static_cast<c10::BFloat16*>(dst)[first + i] = c10::BFloat16(tile[i]);
        } else if constexpr (kKind == Expand::kF16) {
          static_cast<c10::Half*>(dst)[first + i] = c10::Half(tile[i]);
        } else if constexpr (kKind == Expand::kBF16AsF32) {
          static_cast<float*>(dst)[first + i] = static_cast<float>(c10::BFloat16(tile[i]));
        } else {
          static_cast<float*>(dst)[first + i] = static_cast<float>(c10::Half(tile[i]));
        }
      }
    }
  }
}

// Run-time kind to the template (the table entry's body). A switch, not
// with_expand_kind's lambda: a lambda's body would not inherit the caller's
// target attribute.
inline __attribute__((always_inline)) void ggml_expand_body(detail::GgmlCode code,
                                                            const uint8_t* src, int64_t blocks,
                                                            int32_t block_size, int32_t type_size,
                                                            Expand kind, void* dst) {
  switch (kind) {
    case Expand::kF32:
      return ggml_expand_as<Expand::kF32>(code, src, blocks, block_size, type_size, dst);
    case Expand::kBF16:
      return ggml_expand_as<Expand::kBF16>(code, src, blocks, block_size, type_size, dst);
    case Expand::kF16:
      return ggml_expand_as<Expand::kF16>(code, src, blocks, block_size, type_size, dst);
    case Expand::kBF16AsF32:
      return ggml_expand_as<Expand::kBF16AsF32>(code, src, blocks, block_size, type_size, dst);
    case Expand::kF16AsF32:
      return ggml_expand_as<Expand::kF16AsF32>(code, src, blocks, block_size, type_size, dst);
  }
}

}  // namespace qlora::cpu
