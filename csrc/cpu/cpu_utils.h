// Helpers for the CPU kernels: dtype conversion and the grain sizes that
// keep at::parallel_for chunks large enough to amortise thread wake-ups.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <string_view>
#include <vector>

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include "ops/checks.h"

namespace qlora::cpu {

// Elements per parallel chunk: below this, waking a thread costs more
// than the work it would take over.
constexpr int64_t kGrainElements = 1 << 15;

inline int64_t grain_in_blocks(int64_t blocksize) {
  return blocksize >= kGrainElements ? 1 : kGrainElements / blocksize;
}

// Rounds a float to T the way torch's .to(dtype) does (round to nearest even).
template <typename T>
inline T round_to(float v) {
  return static_cast<T>(v);
}

template <typename T>
inline void to_float(const T* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// This thread's scratch buffer of at least n T: grows, never shrinks, so a
// kernel called once per layer and step allocates once. One buffer per T,
// shared by every kernel: hold it only within one kernel call.
template <typename T>
T* thread_buffer(int64_t n) {
  thread_local std::vector<T> buffer;
  if (static_cast<int64_t>(buffer.size()) < n) {
    buffer.clear();
    buffer.shrink_to_fit();
    buffer.resize(n);
  }
  return buffer.data();
}

// Large fresh outputs are first touched by our kernels: asking for
// transparent huge pages turns ~16k page faults per 64 MB into ~32 (where
// THP is in "madvise" mode, the common default). A hint only.
void advise_huge_pages(void* data, size_t nbytes);

// Calls f with a value of the element type of dtype (float32, float16 or
// bfloat16: the only dtypes the ops accept, checked before dispatch).
template <typename F>
void dispatch_float_types(at::ScalarType dtype, const char* op, F&& f) {
  switch (dtype) {
    case at::kFloat:
      return f(float{});
    case at::kHalf:
      return f(c10::Half{});
    case at::kBFloat16:
      return f(c10::BFloat16{});
    default:
      TORCH_CHECK(false, "qlora::", op, ": unsupported dtype ", dtype);
  }
}

// Remembers the lowest block holding inf/NaN across parallel chunks, so the
// error is raised once, on the calling thread, naming the first bad block.
class FirstBadBlock {
 public:
  void report(int64_t block) {
    int64_t cur = first_.load();
    while (block < cur && !first_.compare_exchange_weak(cur, block)) {
    }
  }
  void raise_if_any(std::string_view op, int64_t blocksize) const {
    if (first_.load() != kNone) detail::fail_non_finite(op, first_.load(), blocksize);
  }

 private:
  static constexpr int64_t kNone = std::numeric_limits<int64_t>::max();
  std::atomic<int64_t> first_{kNone};
};

}  // namespace qlora::cpu
