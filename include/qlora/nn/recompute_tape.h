// Selective recomputation for gradient checkpointing: a checkpointed layer
// records the outputs of its frozen 4-bit matmuls in its first forward pass
// and replays them when backward recomputes it, so only the cheap ops (and
// the small adapter matmuls) run twice. The frozen matmuls are most of a
// QLoRA layer's FLOPs; their outputs are a few times the hidden size per
// token, a fraction of what the layer would keep without checkpointing.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>
#include <vector>

namespace qlora::nn {

class RecomputeTape {
 public:
  void record(const at::Tensor& output) { outputs_.push_back(output); }
  // The next recorded output; an error when there is none or its shape
  // is not `sizes` (the recomputation did not retrace the recorded pass).
  at::Tensor replay(at::IntArrayRef sizes);
  bool fully_replayed() const { return next_ == outputs_.size(); }
  size_t size() const { return outputs_.size(); }
  int64_t bytes() const;
  void clear();

 private:
  std::vector<at::Tensor> outputs_;
  size_t next_ = 0;
};

// While a TapeScope lives, the QLoRALinear layers run on this thread
// record into (or replay from) `tape`; scopes nest, the innermost wins.
class TapeScope {
 public:
  enum class Mode { kRecord, kReplay };
  TapeScope(RecomputeTape& tape, Mode mode);
  ~TapeScope();
  TapeScope(const TapeScope&) = delete;
  TapeScope& operator=(const TapeScope&) = delete;

 private:
  RecomputeTape* previous_tape_;
  Mode previous_mode_;
};

// The tape this thread records into / replays from, or nullptr.
RecomputeTape* recording_tape();
RecomputeTape* replaying_tape();

}  // namespace qlora::nn
