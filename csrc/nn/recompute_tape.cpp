#include "qlora/nn/recompute_tape.h"

#include <c10/util/Exception.h>

namespace qlora::nn {
namespace {

thread_local RecomputeTape* active_tape = nullptr;
thread_local TapeScope::Mode active_mode = TapeScope::Mode::kRecord;

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

TapeScope::TapeScope(RecomputeTape& tape, Mode mode)
    : previous_tape_(active_tape), previous_mode_(active_mode) {
  active_tape = &tape;
  active_mode = mode;
}

TapeScope::~TapeScope() {
  active_tape = previous_tape_;
  active_mode = previous_mode_;
}

RecomputeTape* recording_tape() {
  return active_mode == TapeScope::Mode::kRecord ? active_tape : nullptr;
}
RecomputeTape* replaying_tape() {
  return active_mode == TapeScope::Mode::kReplay ? active_tape : nullptr;
}

}  // namespace qlora::nn
