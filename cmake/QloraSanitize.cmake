# Sanitizer and fuzzing builds (CMakePresets.json "sanitize"; docs/ROBUSTNESS.md).
#   QLORA_SANITIZE  every target of ours under AddressSanitizer + UBSan
#                   (the GoogleTest suite once under the sanitizers)
#   QLORA_FUZZ      (clang) libFuzzer programs for tests/fuzz/targets; the
#                   libraries get coverage instrumentation for them
# Neither touches the normal build, which replays the fuzz corpus through
# its own sanitized copy of the parsers (tests/fuzz/CMakeLists.txt).
option(QLORA_SANITIZE "Build everything under AddressSanitizer + UndefinedBehaviorSanitizer" OFF)
option(QLORA_FUZZ "Build the libFuzzer programs (clang; implies QLORA_SANITIZE)" OFF)
if(QLORA_FUZZ)
  if(NOT CMAKE_CXX_COMPILER_ID MATCHES "Clang")
    message(FATAL_ERROR "QLORA_FUZZ needs clang (libFuzzer): configure with --preset sanitize "
                        "or -DCMAKE_CXX_COMPILER=clang++")
  endif()
  set(QLORA_SANITIZE ON CACHE BOOL "" FORCE)
endif()

# The flags of a sanitized translation unit: UB is an error that stops the
# run (the fuzzer keeps the input), not a warning that scrolls past.
set(QLORA_SANITIZER_FLAGS -fsanitize=address,undefined -fno-sanitize-recover=undefined
    -fno-omit-frame-pointer)

add_library(qlora_sanitizer INTERFACE)
if(QLORA_SANITIZE)
  target_compile_options(qlora_sanitizer INTERFACE ${QLORA_SANITIZER_FLAGS}
    $<$<BOOL:${QLORA_FUZZ}>:-fsanitize=fuzzer-no-link>)
  target_link_options(qlora_sanitizer INTERFACE -fsanitize=address,undefined)
endif()
