// The NCCL process group, in its own translation unit: only CUDA builds that
// find nccl.h compile nccl_backend_cuda.cpp; the others link nccl_backend_none.cpp.
#pragma once

#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>

#include <chrono>

namespace qlora::dist::detail {

bool nccl_available();
c10::intrusive_ptr<c10d::Backend> make_nccl_backend(const c10::intrusive_ptr<c10d::Store>& store,
                                                    int rank, int world_size,
                                                    std::chrono::milliseconds timeout);

}  // namespace qlora::dist::detail
