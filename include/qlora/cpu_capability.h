// The instruction-set levels of the CPU kernels and the one run-time choice
// between them. Every CPU kernel family (4-bit quantize/dequantize, gemv,
// matmul, dropout, the dense GEMM path under matmul_4bit's backward and the
// fused cross-entropy) asks cpu_capability() and runs the best code the CPU
// has; nothing assumes an instruction set at build time.
//
// The level can be capped, so every path runs on any machine:
//   QLORA_CPU_CAPABILITY=portable|avx2|avx512|avx512_bf16   (environment, read once)
//   qlora::set_cpu_capability(...)                          (C++, e.g. tests)
//   torch.ops.qlora.cpu_capability("avx2")                  (Python)
// A cap above what the CPU supports runs at the detected level.
#pragma once

#include <optional>
#include <string>
#include <string_view>

namespace qlora {

// Ordered: each level has everything of the levels below it.
enum class CpuCapability : int {
  kPortable = 0,    // plain C++, whatever the compiler's baseline x86-64 target makes of it
  kAvx2 = 1,        // AVX2 + FMA + F16C (Haswell / Zen 1 and later)
  kAvx512 = 2,      // AVX-512 F, BW, DQ, VL (Skylake-SP / Zen 4 and later)
  kAvx512Bf16 = 3,  // AVX-512 + AVX512-BF16: bfloat16 GEMMs in bfloat16 (AMX tiles where present)
};

// "portable", "avx2", "avx512", "avx512_bf16".
const char* cpu_capability_name(CpuCapability level);
std::optional<CpuCapability> parse_cpu_capability(std::string_view name);

// What this CPU and the OS (saved vector state) support.
CpuCapability detected_cpu_capability();

// The level the kernels use now: the detected one, capped by
// QLORA_CPU_CAPABILITY or set_cpu_capability. Throws (naming the variable and
// the valid values) when QLORA_CPU_CAPABILITY holds something else.
CpuCapability cpu_capability();

// Caps the level for the whole process (clamped to the detected one) and
// returns the level now in force. Thread-safe; kernels already running keep
// the level they started with.
CpuCapability set_cpu_capability(CpuCapability cap);

// One line for logs and benchmark headers, e.g.
// "avx2 (detected avx512_bf16, capped by QLORA_CPU_CAPABILITY=avx2; amx: no)".
std::string cpu_capability_report();

}  // namespace qlora
