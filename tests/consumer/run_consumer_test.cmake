# ctest driver: install the build tree, configure + build the consumer
# against the installed package, run it.
set(prefix "${QLORA_BUILD_DIR}/consumer-install")
set(build "${QLORA_BUILD_DIR}/consumer-build")
function(run)
  execute_process(COMMAND ${ARGV} RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "failed (${rc}): ${ARGV}")
  endif()
endfunction()
run(${CMAKE_COMMAND} --install "${QLORA_BUILD_DIR}" --prefix "${prefix}")
# Environment variables avoid CMake's ';' list splitting on the command line.
set(ENV{CMAKE_PREFIX_PATH} "${prefix}:${QLORA_TORCH_PREFIX}")
set(ENV{TORCH_CUDA_ARCH_LIST} "${QLORA_CUDA_ARCH_LIST}")
run(${CMAKE_COMMAND} -S "${QLORA_SOURCE_DIR}/tests/consumer" -B "${build}" -G Ninja
    -DCMAKE_BUILD_TYPE=Release)
run(${CMAKE_COMMAND} --build "${build}" -j 2)
run("${build}/consumer")
