#include "optim/state_storage.h"

#include <ATen/ops/from_blob.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <list>
#include <map>
#include <mutex>
#include <set>

#ifdef QLORA_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#endif

namespace qlora::optim {

namespace {

class PlainStorage : public StateStorage {
 public:
  at::Tensor zeros(at::IntArrayRef sizes, at::ScalarType dtype, c10::Device device) override {
    return at::zeros(sizes, at::TensorOptions().dtype(dtype).device(device));
  }
  bool owns(const at::Tensor&) const override { return true; }
};

// Live allocations, shared with the tensors' deleters (which may run after
// the storage is gone).
struct Registry {
  std::mutex mutex;
  std::map<const void*, size_t> sizes;
  std::set<const void*> managed;  // CUDA states in managed memory (prefetched before use)
  void add(const void* p, size_t n, bool is_managed = false) {
    std::lock_guard<std::mutex> lock(mutex);
    sizes[p] = n;
    if (is_managed) managed.insert(p);
  }
  void remove(const void* p) {
    std::lock_guard<std::mutex> lock(mutex);
    sizes.erase(p);
    managed.erase(p);
  }
  bool is_managed(const void* p) {
    std::lock_guard<std::mutex> lock(mutex);
    return managed.count(p) != 0;
  }
  bool contains(const void* p) {
    std::lock_guard<std::mutex> lock(mutex);
    return sizes.count(p) != 0;
  }
};

size_t round_to_pages(size_t n) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return (n + page - 1) / page * page;
}

class PagedStorage : public StateStorage {
 public:
  PagedStorage(std::string page_dir, int64_t budget)
      : dir_(std::move(page_dir)), budget_(budget), registry_(std::make_shared<Registry>()) {}
  ~PagedStorage() override {
    if (fd_ >= 0) close(fd_);  // mappings stay valid; the unlinked file goes with the last one
  }

  at::Tensor zeros(at::IntArrayRef sizes, at::ScalarType dtype, c10::Device device) override {
    int64_t numel = 1;
    for (int64_t s : sizes) numel *= s;
    const size_t bytes = round_to_pages(std::max<size_t>(1, numel * c10::elementSize(dtype)));
    if (device.is_cuda()) return managed_zeros(sizes, dtype, device, bytes);
    TORCH_CHECK(device.is_cpu(), "PagedAdamW: paged states on ", device, " are not supported");
    return file_backed_zeros(sizes, dtype, bytes);
  }

  void before_use(const at::Tensor& state) override {
#ifdef QLORA_WITH_CUDA
    if (state.is_cuda() && registry_->is_managed(state.data_ptr())) {
      const size_t bytes = state.numel() * state.element_size();
      const auto stream = c10::cuda::getCurrentCUDAStream(state.device().index());
#if CUDART_VERSION >= 13000
      cudaMemLocation location{};
      location.type = cudaMemLocationTypeDevice;
      location.id = state.device().index();
      C10_CUDA_CHECK(cudaMemPrefetchAsync(state.data_ptr(), bytes, location, 0, stream));
#else
      C10_CUDA_CHECK(cudaMemPrefetchAsync(state.data_ptr(), bytes, state.device().index(), stream));
#endif
    }
#else
    (void)state;
#endif
  }

  // CPU: least recently used states beyond the budget are dropped from the
  // mapping; the kernel keeps their (dirty) pages in the page cache or
  // writes them to the page file, and reads them back on the next use.
  void after_use(const at::Tensor& state) override {
    if (!state.is_cpu() || !owns(state)) return;
    const void* p = state.data_ptr();
    lru_.remove(p);
    lru_.push_back(p);
    resident_[p] = round_to_pages(state.numel() * state.element_size());
    int64_t total = 0;
    for (const auto& [ptr, n] : resident_) total += static_cast<int64_t>(n);
    while (total > budget_ && !lru_.empty()) {
      const void* victim = lru_.front();
      lru_.pop_front();
      const size_t n = resident_[victim];
      resident_.erase(victim);
      madvise(const_cast<void*>(victim), n, MADV_DONTNEED);
      total -= static_cast<int64_t>(n);
    }
  }

  bool owns(const at::Tensor& t) const override { return registry_->contains(t.data_ptr()); }

 private:
  void open_page_file() {
    std::string dir = dir_;
    if (dir.empty()) dir = std::getenv("TMPDIR") ? std::getenv("TMPDIR") : "/tmp";
    std::string path = dir + "/qlora-optimizer-states-XXXXXX";
    fd_ = mkstemp(path.data());
    TORCH_CHECK(fd_ >= 0, "PagedAdamW: cannot create a page file in \"", dir,
                "\": ", std::strerror(errno));
    unlink(path.c_str());  // nothing to clean up if the run is killed
  }

  at::Tensor file_backed_zeros(at::IntArrayRef sizes, at::ScalarType dtype, size_t bytes) {
    if (fd_ < 0) open_page_file();
    const off_t offset = file_size_;
    TORCH_CHECK(ftruncate(fd_, offset + static_cast<off_t>(bytes)) == 0,
                "PagedAdamW: cannot grow the page file to ", offset + bytes,
                " bytes: ", std::strerror(errno));
    file_size_ += static_cast<off_t>(bytes);
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd_, offset);
    TORCH_CHECK(p != MAP_FAILED,
                "PagedAdamW: mmap of the page file failed: ", std::strerror(errno));
    registry_->add(p, bytes);
    auto registry = registry_;
    return at::from_blob(
        p, sizes,
        [registry, bytes](void* ptr) {
          registry->remove(ptr);
          munmap(ptr, bytes);
        },
        at::TensorOptions().dtype(dtype));
  }

  // Managed memory only within what the card has free (less a reserve for
  // activations): oversubscribed managed memory can hang the GPU, not just
  // this process. Past that, states live in pinned host memory that the
  // kernels read over the bus (bitsandbytes' paged optimizer evicts to the
  // host in the same way, only on demand).
  at::Tensor managed_zeros(at::IntArrayRef sizes, at::ScalarType dtype, c10::Device device,
                           size_t bytes) {
#ifdef QLORA_WITH_CUDA
    const c10::cuda::CUDAGuard guard(device);
    size_t free = 0, total = 0;
    C10_CUDA_CHECK(cudaMemGetInfo(&free, &total));
    const size_t reserve = std::max<size_t>(total / 20, size_t{1} << 30);
    void* p = nullptr;
    const bool managed = bytes + reserve <= free;
    if (managed) {
      C10_CUDA_CHECK(cudaMallocManaged(&p, bytes));
      C10_CUDA_CHECK(cudaMemset(p, 0, bytes));
    } else {
      C10_CUDA_CHECK(cudaHostAlloc(&p, bytes, cudaHostAllocMapped));
      std::memset(p, 0, bytes);
      if (!warned_host_) {
        warned_host_ = true;
        TORCH_WARN("PagedAdamW: ", device, " has ", free >> 20,
                   " MiB free; optimizer states beyond it go to pinned host memory");
      }
    }
    registry_->add(p, bytes, managed);
    auto registry = registry_;
    return at::from_blob(
        p, sizes,
        [registry, managed](void* ptr) {
          registry->remove(ptr);
          if (managed)
            cudaFree(ptr);
          else
            cudaFreeHost(ptr);
        },
        at::TensorOptions().dtype(dtype).device(device));
#else
    (void)sizes, (void)dtype, (void)bytes;
    TORCH_CHECK(false, "PagedAdamW: states on ", device, " need a CUDA build of qlora");
#endif
  }

  std::string dir_;
  int64_t budget_;
  std::shared_ptr<Registry> registry_;
  int fd_ = -1;
  off_t file_size_ = 0;
  std::list<const void*> lru_;
  bool warned_host_ = false;
  std::map<const void*, size_t> resident_;
};

}  // namespace

std::unique_ptr<StateStorage> make_plain_storage() { return std::make_unique<PlainStorage>(); }

std::unique_ptr<StateStorage> make_paged_storage(const std::string& page_dir,
                                                 int64_t resident_budget_bytes) {
  return std::make_unique<PagedStorage>(page_dir, resident_budget_bytes);
}

}  // namespace qlora::optim
