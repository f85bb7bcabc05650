// Exact nearest-code search of the 8-bit blockwise quantizer (the number of
// decision boundaries strictly below v), sped up by a 65,536-bin table on
// the top 16 bits of v's order-preserving integer key: each bin stores the
// rank of its smallest value, so a lookup then steps over the (usually zero
// or one) boundaries inside the bin. Same codes as detail::encode_8bit's
// binary search, bit for bit; bitsandbytes' CPU library uses a table of
// that size as an approximation instead.
#pragma once

#include <array>
#include <cstdint>
#include <memory>

namespace qlora::cpu {

class NearestCodeTable {
 public:
  // The table for these 255 sorted boundaries, built once per distinct set
  // and shared (the optimizer's two dynamic maps are built once per process).
  static std::shared_ptr<const NearestCodeTable> for_bounds(const std::array<float, 255>& bounds);

  explicit NearestCodeTable(const std::array<float, 255>& bounds);

  // v finite (normalised into [-1, 1] by the quantizer).
  uint8_t encode(float v) const {
    int r = start_[key(v) >> 16];
    while (r < 255 && v > bounds_[r]) ++r;
    return static_cast<uint8_t>(r);
  }

  // Float order as unsigned integer order (negative values reversed below the positives).
  static uint32_t key(float v);

 private:
  std::array<float, 255> bounds_;
  std::array<uint8_t, 65536> start_;
};

}  // namespace qlora::cpu
