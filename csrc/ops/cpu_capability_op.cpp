// torch.ops.qlora.cpu_capability(level=None) -> str: the CPU kernels' level
// from Python (include/qlora/cpu_capability.h); with a level, caps it first.
// Benchmarks use it to compare levels in one process.
#include <torch/library.h>

#include <optional>
#include <string>

#include "qlora/cpu_capability.h"

namespace qlora {
namespace {

std::string cpu_capability_op(const std::optional<std::string>& level) {
  if (level.has_value()) {
    const auto cap = parse_cpu_capability(*level);
    TORCH_CHECK(cap.has_value(), "qlora::cpu_capability: '", *level,
                "' is not a level; expected one of portable, avx2, avx512, avx512_bf16");
    set_cpu_capability(*cap);
  }
  return cpu_capability_name(cpu_capability());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(qlora, m) {
  m.def("cpu_capability(str? level=None) -> str", &cpu_capability_op);
}

}  // namespace qlora
