// ProcessGroupNCCL from libtorch_cuda; nccl.h from the CUDA toolkit or the
// wheel's nvidia-nccl package (the CMake find decides which).
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>

#include "dist/nccl_backend.h"

namespace qlora::dist::detail {

bool nccl_available() { return true; }

c10::intrusive_ptr<c10d::Backend> make_nccl_backend(const c10::intrusive_ptr<c10d::Store>& store,
                                                    int rank, int world_size,
                                                    std::chrono::milliseconds timeout) {
  auto opts = c10d::ProcessGroupNCCL::Options::create();
  opts->timeout = timeout;
  return c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world_size, opts);
}

}  // namespace qlora::dist::detail
