// Where training runs: `training.device` (auto | cpu | cuda | cuda:N) and
// `model.compute_dtype` (auto | float32 | bfloat16 | float16) resolved
// against what this machine and this build have, with errors that say why
// a setting cannot be honoured.
#pragma once

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <optional>
#include <string>

namespace qlora::train {

// auto: the first CUDA device when one is visible (and qlora was built with
// its CUDA kernels), else the CPU. Throws std::invalid_argument naming the
// setting: "training.device: cuda, but no CUDA device is visible".
c10::Device resolve_device(const std::string& setting);

// auto: bfloat16 on a GPU that computes in it (compute capability >= 8.0),
// float32 otherwise (the CPU, older GPUs).
at::ScalarType resolve_compute_dtype(const std::string& setting, const c10::Device& device);

struct DeviceMemory {
  int64_t free_bytes = 0, total_bytes = 0;
};
// Free and total memory of a CUDA device; nullopt for the CPU.
std::optional<DeviceMemory> device_memory(const c10::Device& device);

// Peak bytes LibTorch's CUDA allocator handed out on `device` since the
// start (or the last reset); 0 for the CPU.
int64_t peak_device_allocated_bytes(const c10::Device& device);
void reset_peak_device_allocated_bytes(const c10::Device& device);

// Makes a CUDA device this thread's current one (NCCL and the allocator's
// default); nothing for the CPU.
void make_current(const c10::Device& device);

// "NVIDIA H200 (cuda:0, sm_90, 139.8 GiB)", or "CPU".
std::string describe_device(const c10::Device& device);

}  // namespace qlora::train
