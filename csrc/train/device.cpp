#include "qlora/train/device.h"

#include <c10/core/DeviceType.h>
#include <torch/cuda.h>

#include <cstdio>
#include <stdexcept>

#ifdef QLORA_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>
#endif

namespace qlora::train {
namespace {

[[noreturn]] void fail(const std::string& setting, const std::string& why) {
  throw std::invalid_argument("training.device: " + setting + ", but " + why);
}

}  // namespace

c10::Device resolve_device(const std::string& setting) {
#ifdef QLORA_WITH_CUDA
  constexpr bool built_with_cuda = true;
#else
  constexpr bool built_with_cuda = false;
#endif
  const int64_t visible = built_with_cuda ? static_cast<int64_t>(torch::cuda::device_count()) : 0;
  if (setting == "auto") return visible > 0 ? c10::Device(c10::kCUDA, 0) : c10::Device(c10::kCPU);
  if (setting == "cpu") return c10::Device(c10::kCPU);
  if (setting != "cuda" && setting.rfind("cuda:", 0) != 0)
    throw std::invalid_argument("training.device must be auto, cpu, cuda or cuda:N, got \"" +
                                setting + "\"");
  int index = 0;
  if (setting.size() > 5) {
    const std::string digits = setting.substr(5);
    if (digits.empty() || digits.find_first_not_of("0123456789") != std::string::npos ||
        digits.size() > 4)
      throw std::invalid_argument("training.device must be auto, cpu, cuda or cuda:N, got \"" +
                                  setting + "\"");
    index = std::stoi(digits);
  }
  if (!built_with_cuda)
    fail(setting, "this build of qlora has no CUDA kernels (configure with -DQLORA_CUDA=ON)");
  if (visible == 0) fail(setting, "no CUDA device is visible");
  if (index >= visible)
    fail(setting, "only " + std::to_string(visible) + " CUDA device" +
                      (visible == 1 ? " is" : "s are") + " visible (cuda:0" +
                      (visible > 1 ? " .. cuda:" + std::to_string(visible - 1) : "") + ")");
  return c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(index));
}

at::ScalarType resolve_compute_dtype(const std::string& setting, const c10::Device& device) {
  if (setting == "float32") return at::kFloat;
  if (setting == "bfloat16") return at::kBFloat16;
  if (setting == "float16") return at::kHalf;
  if (setting != "auto")
    throw std::invalid_argument(
        "model.compute_dtype must be auto, float32, bfloat16 or float16, got \"" + setting + "\"");
#ifdef QLORA_WITH_CUDA
  if (device.is_cuda()) {
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, device.index()) == cudaSuccess && prop.major >= 8)
      return at::kBFloat16;
  }
#else
  (void)device;
#endif
  return at::kFloat;
}

std::optional<DeviceMemory> device_memory(const c10::Device& device) {
#ifdef QLORA_WITH_CUDA
  if (device.is_cuda()) {
    const c10::cuda::CUDAGuard guard(device);
    size_t free = 0, total = 0;
    if (cudaMemGetInfo(&free, &total) != cudaSuccess) return std::nullopt;
    return DeviceMemory{static_cast<int64_t>(free), static_cast<int64_t>(total)};
  }
#else
  (void)device;
#endif
  return std::nullopt;
}

int64_t peak_device_allocated_bytes(const c10::Device& device) {
#ifdef QLORA_WITH_CUDA
  if (device.is_cuda()) {
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device.index());
    return stats.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)]
        .peak;
  }
#else
  (void)device;
#endif
  return 0;
}

void reset_peak_device_allocated_bytes(const c10::Device& device) {
#ifdef QLORA_WITH_CUDA
  if (device.is_cuda()) c10::cuda::CUDACachingAllocator::resetPeakStats(device.index());
#else
  (void)device;
#endif
}

void make_current(const c10::Device& device) {
#ifdef QLORA_WITH_CUDA
  if (device.is_cuda()) c10::cuda::set_device(device.index());
#else
  (void)device;
#endif
}

std::string describe_device(const c10::Device& device) {
#ifdef QLORA_WITH_CUDA
  if (device.is_cuda()) {
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, device.index()) != cudaSuccess) return device.str();
    char size[32];
    std::snprintf(size, sizeof(size), "%.1f GiB",
                  static_cast<double>(prop.totalGlobalMem) / (1 << 30));
    return std::string(prop.name) + " (" + device.str() + ", sm_" + std::to_string(prop.major) +
           std::to_string(prop.minor) + ", " + size + ")";
  }
#endif
  return device.is_cpu() ? "CPU" : device.str();
}

}  // namespace qlora::train
