// CPU feature detection (cpuid + the OS-enabled state in XCR0) and the
// process-wide cap of include/qlora/cpu_capability.h.
#include "qlora/cpu_capability.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <string>

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#define QLORA_X86_CPUID 1
#endif

namespace qlora {
namespace {

constexpr const char* kNames[] = {"portable", "avx2", "avx512", "avx512_bf16"};
constexpr const char* kEnv = "QLORA_CPU_CAPABILITY";

struct Features {
  CpuCapability level = CpuCapability::kPortable;
  bool amx = false;
};

#if defined(QLORA_X86_CPUID)
uint64_t xcr0() {
  uint32_t lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (uint64_t{hi} << 32) | lo;
}

bool bit(uint32_t reg, int i) { return (reg >> i) & 1u; }
#endif

Features detect() {
  Features f;
#if defined(QLORA_X86_CPUID)
  uint32_t a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool fma = bit(c, 12), osxsave = bit(c, 27), avx = bit(c, 28), f16c = bit(c, 29);
  if (!(osxsave && avx)) return f;
  const uint64_t xcr = xcr0();
  const bool os_ymm = (xcr & 0x6) == 0x6;    // SSE + AVX state saved by the OS
  const bool os_zmm = (xcr & 0xE0) == 0xE0;  // opmask + both ZMM halves
  const bool os_amx = (xcr & 0x60000) == 0x60000;
  uint32_t b7 = 0, c7 = 0, d7 = 0, a71 = 0, unused = 0;
  if (!__get_cpuid_count(7, 0, &a, &b7, &c7, &d7)) return f;
  __get_cpuid_count(7, 1, &a71, &unused, &unused, &unused);
  const bool avx2 = bit(b7, 5);
  const bool avx512 = bit(b7, 16) && bit(b7, 17) && bit(b7, 30) && bit(b7, 31);  // F DQ BW VL
  const bool avx512_bf16 = bit(a71, 5);
  f.amx = os_amx && bit(d7, 22) && bit(d7, 24);  // AMX-BF16 + AMX-TILE
  if (!(os_ymm && avx2 && fma && f16c)) return f;
  f.level = CpuCapability::kAvx2;
  if (!(os_zmm && avx512)) return f;
  f.level = avx512_bf16 ? CpuCapability::kAvx512Bf16 : CpuCapability::kAvx512;
#endif
  return f;
}

const Features& features() {
  static const Features f = detect();
  return f;
}

CpuCapability clamp(CpuCapability cap) {
  return static_cast<CpuCapability>(
      std::min(static_cast<int>(cap), static_cast<int>(features().level)));
}

// The cap from the environment, read on first use. A bad value is an error
// at every use (not once at load time, where it could not be reported).
CpuCapability env_cap() {
  const char* env = std::getenv(kEnv);
  if (env == nullptr || *env == '\0') return features().level;
  const auto level = parse_cpu_capability(env);
  TORCH_CHECK(level.has_value(), kEnv, "='", env,
              "' is not a CPU capability level; expected one of portable, avx2, avx512, "
              "avx512_bf16");
  return clamp(*level);
}

constexpr int kUnset = -1;
std::atomic<int>& active() {
  static std::atomic<int> level{kUnset};
  return level;
}

}  // namespace

const char* cpu_capability_name(CpuCapability level) { return kNames[static_cast<int>(level)]; }

std::optional<CpuCapability> parse_cpu_capability(std::string_view name) {
  for (int i = 0; i < 4; ++i)
    if (name == kNames[i]) return static_cast<CpuCapability>(i);
  if (name == "default") return CpuCapability::kPortable;  // ATen's name for it
  return std::nullopt;
}

CpuCapability detected_cpu_capability() { return features().level; }

CpuCapability cpu_capability() {
  int level = active().load(std::memory_order_relaxed);
  if (level == kUnset) {
    int expected = kUnset;
    active().compare_exchange_strong(expected, static_cast<int>(env_cap()));
    level = active().load();
  }
  return static_cast<CpuCapability>(level);
}

CpuCapability set_cpu_capability(CpuCapability cap) {
  const CpuCapability level = clamp(cap);
  active().store(static_cast<int>(level));
  return level;
}

std::string cpu_capability_report() {
  std::string s = cpu_capability_name(cpu_capability());
  s += " (detected ";
  s += cpu_capability_name(detected_cpu_capability());
  if (const char* env = std::getenv(kEnv); env && *env) {
    s += ", ";
    s += kEnv;
    s += "=";
    s += env;
  }
  s += features().amx ? "; amx: yes)" : "; amx: no)";
  return s;
}

}  // namespace qlora
