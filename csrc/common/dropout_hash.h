// The keep/drop decision of a dropout mask as a pure function of (seed,
// element index): a counter-based generator, so a mask is regenerated in
// backward instead of being stored, is identical in a checkpoint
// recomputation, and any element can be computed by any thread (or GPU
// lane) in any order.
#pragma once

#include <cstdint>

#include "common/host_device.h"

namespace qlora::detail {

// Chris Wellons' "lowbias32" integer hash: full avalanche in two multiplies,
// 32-bit only so it vectorises on any SIMD width.
QLORA_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

struct DropoutKey {
  uint32_t k0, k1;     // the two halves of the 64-bit seed
  uint32_t threshold;  // drop when the hash is below p * 2^32
  float scale;         // 1 / (1 - p)
};

inline DropoutKey dropout_key(uint64_t seed, double p) {
  const double t = p * 4294967296.0;
  return {static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32),
          t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t),
          static_cast<float>(1.0 / (1.0 - p))};
}

// Two keyed rounds: the index's low and high words both reach every bit.
QLORA_HD bool dropout_keeps(const DropoutKey& key, uint64_t index) {
  const uint32_t h = mix32(mix32(static_cast<uint32_t>(index) ^ key.k0) +
                           (static_cast<uint32_t>(index >> 32) ^ key.k1));
  return h >= key.threshold;
}

}  // namespace qlora::detail
