// The GGUF reader's dequantisation: the shared block decoders of
// common/ggml_blocks.h over a whole tensor, in parallel.
#include "io/ggml_dequant.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>

#include "common/ggml_blocks.h"

// Blocks are read byte by byte in file (little-endian) order.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "GGUF dequantisation assumes a little-endian host");

namespace qlora::io {

bool ggml_can_dequantize(GgmlType type) {
  return qlora::detail::ggml_block_layout(static_cast<int32_t>(type)) != nullptr;
}

namespace detail {

void dequantize_ggml(GgmlType type, const uint8_t* src, int64_t numel, float* dst) {
  const auto* layout = qlora::detail::ggml_block_layout(static_cast<int32_t>(type));
  const GgmlTypeTraits& traits = ggml_type_traits(type);
  TORCH_INTERNAL_ASSERT(layout != nullptr, "no dequantiser for ggml type ", traits.name);
  TORCH_INTERNAL_ASSERT(numel % traits.block_size == 0);
  // A tensor's bytes are just its blocks back to back (a row is a whole
  // number of blocks), so splitting by blocks rather than by rows keeps
  // 1-D tensors and single long rows parallel too. ~16K elements per task
  // amortises the scheduling.
  const int64_t n_blocks = numel / traits.block_size;
  const int64_t grain = std::max<int64_t>(1, 16384 / traits.block_size);
  at::parallel_for(0, n_blocks, grain, [&](int64_t begin, int64_t end) {
    qlora::detail::ggml_decode_blocks(layout->code, src + begin * traits.type_size, end - begin,
                                      dst + begin * traits.block_size);
  });
}

}  // namespace detail
}  // namespace qlora::io
