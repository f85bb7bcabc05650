// The states of LibTorch's default generators, captured and restored as one
// value: the CPU generator (it seeds hash_dropout on every device) and, for
// a model elsewhere, that device's. Gradient checkpointing restores it to
// recompute a layer with the same dropout masks; checkpoints save it so a
// resumed run draws what an uninterrupted one would.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

namespace qlora::util {

struct RngState {
  at::Tensor cpu;           // the CPU generator's state (a uint8 tensor)
  at::Tensor device_state;  // undefined for the CPU
  c10::Device device{c10::kCPU};

  static RngState capture(const c10::Device& device = c10::Device(c10::kCPU));
  void restore() const;
};

}  // namespace qlora::util
