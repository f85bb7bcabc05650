# The layering the two libraries promise, checked on the built files:
# libqlora_ops needs LibTorch (and the CUDA runtime) only, never yaml-cpp,
# PCRE2, spdlog/fmt or libqlora, and references no symbol that only
# libqlora defines. Run with -DOPS_LIB=<libqlora_ops.so> -DREADELF=... -DNM=...
execute_process(COMMAND ${READELF} -d ${OPS_LIB} OUTPUT_VARIABLE dynamic RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "readelf failed on ${OPS_LIB}")
endif()
string(REGEX MATCHALL "Shared library: \\[[^]]+\\]" needed "${dynamic}")
message(STATUS "libqlora_ops needs: ${needed}")
foreach(forbidden yaml-cpp pcre2 spdlog fmt "libqlora\\.so")
  if(needed MATCHES "${forbidden}")
    message(FATAL_ERROR "libqlora_ops must depend on torch only, but it needs ${forbidden}: ${needed}")
  endif()
endforeach()
if(NOT needed MATCHES "libtorch")
  message(FATAL_ERROR "libqlora_ops does not link LibTorch? ${needed}")
endif()
execute_process(COMMAND ${NM} -D -C --undefined-only ${OPS_LIB} OUTPUT_VARIABLE undefined)
string(REGEX MATCHALL "[^\n]*qlora::[^\n]*" ours "${undefined}")
if(ours)
  message(FATAL_ERROR "libqlora_ops uses qlora symbols it does not define (from libqlora?):\n${ours}")
endif()
