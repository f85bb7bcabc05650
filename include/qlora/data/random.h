// Deterministic randomness: the same shuffles and hashes on every platform and standard library
// (std::mt19937_64, fully specified, through our own Fisher-Yates and uniform integer).
#pragma once

#include <cstddef>
#include <cstdint>
#include <random>
#include <string_view>
#include <vector>

namespace qlora::data {

// Uniform in [0, n) by rejection on a 64-bit draw (unbiased, identical on every platform).
// n must be > 0.
uint64_t uniform_below(std::mt19937_64& rng, uint64_t n);
// Fisher-Yates (from the last index down, swapping i with uniform_below(i + 1)) on 0..n-1,
// with std::mt19937_64 seeded by `seed`.
std::vector<size_t> shuffled_indices(size_t n, uint64_t seed);
// FNV-1a, 64-bit: a hash that never changes between runs, builds or platforms.
uint64_t stable_hash(std::string_view bytes);

}  // namespace qlora::data
