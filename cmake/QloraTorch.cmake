# LibTorch comes from the pinned PyPI torch wheel in the repo's virtualenv:
# torch.utils.cmake_prefix_path points at its share/cmake/Torch.
if(NOT EXISTS "${QLORA_PYTHON}")
  message(FATAL_ERROR "QLORA_PYTHON='${QLORA_PYTHON}' does not exist: run tools/setup.sh "
                      "(or `make test`) first, or pass -DQLORA_PYTHON=/path/to/python with torch installed")
endif()
execute_process(
  COMMAND "${QLORA_PYTHON}" -c "import torch, torch.utils; print(torch.utils.cmake_prefix_path); print(torch.__version__)"
  OUTPUT_VARIABLE _qlora_torch_out RESULT_VARIABLE _qlora_torch_rc OUTPUT_STRIP_TRAILING_WHITESPACE)
if(NOT _qlora_torch_rc EQUAL 0)
  message(FATAL_ERROR "${QLORA_PYTHON} cannot import torch; run tools/setup.sh")
endif()
string(REPLACE "\n" ";" _qlora_torch_out "${_qlora_torch_out}")
list(GET _qlora_torch_out 0 QLORA_TORCH_CMAKE_PREFIX)
list(GET _qlora_torch_out 1 QLORA_TORCH_VERSION)
list(APPEND CMAKE_PREFIX_PATH "${QLORA_TORCH_CMAKE_PREFIX}")
get_filename_component(QLORA_TORCH_LIB_DIR "${QLORA_TORCH_CMAKE_PREFIX}/../../lib" ABSOLUTE)

# CUDA: AUTO builds the kernels whenever nvcc is found.
set(QLORA_WITH_CUDA OFF)
if(NOT QLORA_CUDA STREQUAL "OFF")
  if(NOT CMAKE_CUDA_COMPILER AND EXISTS /usr/local/cuda/bin/nvcc)
    set(CMAKE_CUDA_COMPILER /usr/local/cuda/bin/nvcc)
  endif()
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    set(QLORA_WITH_CUDA ON)
  elseif(QLORA_CUDA STREQUAL "ON")
    message(FATAL_ERROR "QLORA_CUDA=ON but no CUDA compiler (nvcc) was found")
  endif()
endif()
if(QLORA_WITH_CUDA)
  # sm_80 (A100) + sm_90 (H100/H200) SASS, plus PTX for newer GPUs. Torch's
  # CMake turns TORCH_CUDA_ARCH_LIST into -gencode flags (its default is a
  # dozen architectures), so CMake's own architecture flags stay off.
  set(TORCH_CUDA_ARCH_LIST "8.0;9.0+PTX" CACHE STRING "CUDA architectures of the qlora kernels")
  set(CMAKE_CUDA_ARCHITECTURES OFF)
  enable_language(CUDA)
  find_package(CUDAToolkit REQUIRED)
endif()

# Torch warns when it sees CMAKE_CUDA_ARCHITECTURES; targets set CUDA_ARCHITECTURES OFF.
unset(CMAKE_CUDA_ARCHITECTURES)
find_package(Torch REQUIRED)
message(STATUS "qlora: LibTorch ${QLORA_TORCH_VERSION} from ${QLORA_TORCH_CMAKE_PREFIX}; CUDA kernels: ${QLORA_WITH_CUDA}")

# TORCH_CXX_FLAGS (the C++11 ABI define) as a usage requirement instead of a global flag.
separate_arguments(QLORA_TORCH_CXX_FLAGS UNIX_COMMAND "${TORCH_CXX_FLAGS}")
