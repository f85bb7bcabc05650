#include "qlora/nn/recompute_tape.h"

#include <c10/util/Exception.h>

namespace qlora::nn {
namespace {

thread_local RecomputeTape* active_tape = nullptr;
thread_local bool active_replaying = false;

}  // namespace

at::Tensor RecomputeTape::replay(at::IntArrayRef sizes) {
  TORCH_CHECK(next_ < outputs_.size(), "selective recomputation: the recomputed layer ran more ",
              "4-bit matmuls than the ", outputs_.size(), " its forward pass recorded");
  const at::Tensor& out = outputs_[next_];
  TORCH_CHECK(out.sizes() == sizes, "selective recomputation: recorded matmul ", next_,
              " has shape ", out.sizes(), " but the recomputation expects ", sizes);
  return outputs_[next_++];
}

int64_t RecomputeTape::bytes() const {
  int64_t n = 0;
  for (const auto& t : outputs_) n += t.numel() * static_cast<int64_t>(t.element_size());
  return n;
}

void RecomputeTape::clear() {
  outputs_.clear();
  outputs_.shrink_to_fit();
  next_ = 0;
}

RecordingTape::RecordingTape(RecomputeTape& tape)
    : previous_(active_tape), previous_replaying_(active_replaying) {
  active_tape = &tape;
  active_replaying = false;
}
RecordingTape::~RecordingTape() {
  active_tape = previous_;
  active_replaying = previous_replaying_;
}

ReplayingTape::ReplayingTape(RecomputeTape& tape)
    : previous_(active_tape), previous_replaying_(active_replaying) {
  active_tape = &tape;
  active_replaying = true;
}
ReplayingTape::~ReplayingTape() {
  active_tape = previous_;
  active_replaying = previous_replaying_;
}

RecomputeTape* recording_tape() { return active_replaying ? nullptr : active_tape; }
RecomputeTape* replaying_tape() { return active_replaying ? active_tape : nullptr; }

}  // namespace qlora::nn
