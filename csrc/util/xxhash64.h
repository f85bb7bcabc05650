// XXH64 (Yann Collet's xxHash, 64-bit variant): a non-cryptographic hash that
// runs at memory speed and mixes every input bit into every output bit, used
// to detect corruption (QNAT's checksums), not tampering.
#pragma once

#include <cstddef>
#include <cstdint>

namespace qlora::util {

// XXH64 of `n` bytes with seed 0: xxhash64("", 0) = 0xEF46DB3751D8E999.
uint64_t xxhash64(const void* data, size_t n);

}  // namespace qlora::util
