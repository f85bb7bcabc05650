#include "qlora/nn/hash_dropout.h"

#include <ATen/CPUGeneratorImpl.h>

#include <atomic>
#include <mutex>

#include "qlora/ops.h"

namespace qlora::nn {
namespace {

std::atomic<uint64_t> g_stream{0};

uint64_t splitmix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// From the CPU generator on every device, so restoring its state (the
// recompute tape, resume) is all a recomputation needs to redraw the mask.
int64_t draw_seed() {
  at::Generator gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  const uint64_t seed = gen.get<at::CPUGeneratorImpl>()->random64();
  const uint64_t stream = g_stream.load();
  return static_cast<int64_t>(stream == 0 ? seed : splitmix64(seed ^ splitmix64(stream)));
}

}  // namespace

at::Tensor hash_dropout(const at::Tensor& x, double p) {
  TORCH_CHECK(p >= 0 && p < 1, "hash_dropout: p must be in [0, 1), got ", p);
  if (p == 0) return x;
  return qlora::hash_dropout(x, p, draw_seed());
}

void set_hash_dropout_stream(uint64_t stream) { g_stream = stream; }

}  // namespace qlora::nn
