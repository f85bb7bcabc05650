// Where optimizer states live. Plain tensors by default; with paging, CUDA
// managed memory (prefetched to the GPU before each update, evictable by the
// driver) or, on CPU, a shared mapping of an unlinked page file whose pages
// the kernel may write back and drop under memory pressure.
#pragma once

#include <ATen/core/Tensor.h>

#include <memory>
#include <string>

namespace qlora::optim {

class StateStorage {
 public:
  virtual ~StateStorage() = default;
  virtual at::Tensor zeros(at::IntArrayRef sizes, at::ScalarType dtype, c10::Device device) = 0;
  // Called before / after the update of the states of one parameter.
  virtual void before_use(const at::Tensor& state) { (void)state; }
  virtual void after_use(const at::Tensor& state) { (void)state; }
  // Whether `t` was allocated here (loaded states are moved in lazily).
  virtual bool owns(const at::Tensor& t) const = 0;
};

std::unique_ptr<StateStorage> make_plain_storage();
std::unique_ptr<StateStorage> make_paged_storage(const std::string& page_dir,
                                                 int64_t resident_budget_bytes);

}  // namespace qlora::optim
