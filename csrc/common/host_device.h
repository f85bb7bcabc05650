// QLORA_HD marks per-element functions shared by the CPU and CUDA kernels:
// __host__ __device__ under nvcc, plain inline functions elsewhere.
#pragma once

#if defined(__CUDACC__)
#define QLORA_HD __host__ __device__ __forceinline__
#else
#define QLORA_HD inline
#endif
