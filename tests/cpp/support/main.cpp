// GoogleTest main of qlora_tests. ctest runs the kernel and layer tests once
// per CPU capability level (tests/CMakeLists.txt); a level this CPU does not
// have exits with 77, which ctest reports as skipped, instead of quietly
// running the level below it a second time.
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>

#include "qlora/cpu_capability.h"

int main(int argc, char** argv) {
  if (const char* want = std::getenv("QLORA_REQUIRE_CPU_CAPABILITY"); want && *want) {
    const auto level = qlora::parse_cpu_capability(want);
    if (!level) {
      std::fprintf(stderr, "QLORA_REQUIRE_CPU_CAPABILITY=%s is not a level\n", want);
      return 2;
    }
    if (static_cast<int>(*level) > static_cast<int>(qlora::detected_cpu_capability())) {
      std::printf("skipped: this CPU's level is %s, below %s\n",
                  qlora::cpu_capability_name(qlora::detected_cpu_capability()), want);
      return 77;
    }
  }
  testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
