#include "util/rng_state.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Context.h>

#include <mutex>

namespace qlora::util {
namespace {

at::Tensor get(at::Generator gen) {
  std::lock_guard<std::mutex> lock(gen.mutex());
  return gen.get_state();
}

void set(at::Generator gen, const at::Tensor& state) {
  std::lock_guard<std::mutex> lock(gen.mutex());
  gen.set_state(state);
}

}  // namespace

RngState RngState::capture(const c10::Device& device) {
  RngState s;
  s.device = device;
  s.cpu = get(at::detail::getDefaultCPUGenerator());
  if (device.type() != c10::kCPU)
    s.device_state = get(at::globalContext().defaultGenerator(device));
  return s;
}

void RngState::restore() const {
  set(at::detail::getDefaultCPUGenerator(), cpu);
  if (device_state.defined()) set(at::globalContext().defaultGenerator(device), device_state);
}

}  // namespace qlora::util
