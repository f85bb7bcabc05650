#include "cpu/nearest_code.h"

#include <algorithm>
#include <cstring>
#include <list>
#include <mutex>

namespace qlora::cpu {

uint32_t NearestCodeTable::key(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return (bits & 0x80000000u) ? ~bits : bits | 0x80000000u;
}

namespace {

float value_of_key(uint32_t k) {
  const uint32_t bits = (k & 0x80000000u) ? k & 0x7FFFFFFFu : ~k;
  float v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

}  // namespace

NearestCodeTable::NearestCodeTable(const std::array<float, 255>& bounds) : bounds_(bounds) {
  // Boundaries strictly below each bin's smallest value; keys rise with the
  // values, so the rank only moves up. Bins of NaN patterns start at 0.
  int rank = 0;
  for (uint32_t bin = 0; bin < 65536; ++bin) {
    const float lowest = value_of_key(bin << 16);
    if (lowest != lowest) {
      start_[bin] = 0;
      continue;
    }
    while (rank < 255 && lowest > bounds_[rank]) ++rank;
    start_[bin] = static_cast<uint8_t>(rank);
  }
}

std::shared_ptr<const NearestCodeTable> NearestCodeTable::for_bounds(
    const std::array<float, 255>& bounds) {
  static std::mutex mutex;
  static std::list<std::shared_ptr<const NearestCodeTable>> cache;  // most recent first
  std::lock_guard<std::mutex> lock(mutex);
  for (auto it = cache.begin(); it != cache.end(); ++it) {
    if (std::memcmp((*it)->bounds_.data(), bounds.data(), sizeof(float) * 255) == 0) {
      cache.splice(cache.begin(), cache, it);
      return cache.front();
    }
  }
  cache.push_front(std::make_shared<const NearestCodeTable>(bounds));
  if (cache.size() > 8) cache.pop_back();
  return cache.front();
}

}  // namespace qlora::cpu
