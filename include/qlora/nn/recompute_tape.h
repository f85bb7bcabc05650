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

// While one of these lives, the QLoRALinear layers run on this thread
// record into (or replay from) `tape`; they nest, the innermost wins.
class RecordingTape {
 public:
  explicit RecordingTape(RecomputeTape& tape);
  ~RecordingTape();
  RecordingTape(const RecordingTape&) = delete;
  RecordingTape& operator=(const RecordingTape&) = delete;

 private:
  RecomputeTape* previous_;
  bool previous_replaying_;
};

class ReplayingTape {
 public:
  explicit ReplayingTape(RecomputeTape& tape);
  ~ReplayingTape();
  ReplayingTape(const ReplayingTape&) = delete;
  ReplayingTape& operator=(const ReplayingTape&) = delete;

 private:
  RecomputeTape* previous_;
  bool previous_replaying_;
};

// The tape this thread records into / replays from, or nullptr.
RecomputeTape* recording_tape();
RecomputeTape* replaying_tape();

}  // namespace qlora::nn
