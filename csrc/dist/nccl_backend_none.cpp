// Builds without CUDA or without nccl.h: no NCCL process group.
#include <stdexcept>

#include "dist/nccl_backend.h"

namespace qlora::dist::detail {

bool nccl_available() { return false; }

c10::intrusive_ptr<c10d::Backend> make_nccl_backend(const c10::intrusive_ptr<c10d::Store>&, int,
                                                    int, std::chrono::milliseconds) {
  throw std::invalid_argument("this build has no NCCL process group (QLORA_CUDA=OFF or no nccl.h)");
}

}  // namespace qlora::dist::detail
