// Platform-independent randomness and hashing. std::mt19937_64's output sequence is fixed by the
// standard; std::uniform_int_distribution's and std::shuffle's are not (libstdc++, libc++ and
// MSVC differ), so everything on top of the engine is ours.
#include <limits>
#include <stdexcept>

#include "data/data_internal.h"

namespace qlora::data {

uint64_t uniform_below(std::mt19937_64& rng, uint64_t n) {
  if (n == 0) throw std::invalid_argument("uniform_below: n must be > 0");
  // Draws below `threshold` = 2^64 mod n would make the low residues more likely; reject them.
  const uint64_t threshold = (0 - n) % n;
  for (;;) {
    const uint64_t x = rng();
    if (x >= threshold) return x % n;
  }
}

std::vector<size_t> shuffled_indices(size_t n, uint64_t seed) {
  std::vector<size_t> indices(n);
  for (size_t i = 0; i < n; ++i) indices[i] = i;
  std::mt19937_64 rng(seed);
  detail::fisher_yates(indices, rng);
  return indices;
}

uint64_t stable_hash(std::string_view bytes) {
  uint64_t h = 0xcbf29ce484222325ULL;
  for (const char c : bytes) {
    h ^= static_cast<uint8_t>(c);
    h *= 0x100000001b3ULL;
  }
  return h;
}

namespace detail {

uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// Each (seed, epoch) pair gets a well-mixed seed of its own, so consecutive epochs (or runs
// with seeds 1, 2, 3) start their engines far apart instead of from neighbouring integers.
uint64_t mix_seed(uint64_t seed, uint64_t stream) { return splitmix64(seed ^ splitmix64(stream)); }

}  // namespace detail
}  // namespace qlora::data
