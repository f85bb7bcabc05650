// The QLoRA trainer: on a ModelContext (4-bit base + LoRA, tokenizer,
// template) it loads the data a TrainConfig names, trains with gradient
// accumulation normalised by label tokens, clipping, an LR schedule and
// PagedAdamW, evaluates, and writes atomic checkpoints from which
// `resume: auto` continues exactly (train/checkpoint.h).
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "qlora/train/config.h"
#include "qlora/train/model_context.h"

namespace qlora::train {

struct TrainSummary {
  double eval_loss_before = 0, eval_loss_after = 0;
  double tokens_per_second = 0;  // training tokens (inputs) per second of the training loop
  int64_t peak_rss_bytes = 0;
  std::string device = "cpu";     // where it trained ("cuda:0")
  int64_t peak_device_bytes = 0;  // peak of LibTorch's CUDA allocator (0 on the CPU)
  double wall_seconds = 0;
  int64_t steps = 0, skipped_steps = 0;
  int64_t resumed_from_step = 0;
  int64_t world_size = 1;             // data-parallel ranks
  int64_t optimizer_state_bytes = 0;  // this rank's (ZeRO-1 shards it)
  // Rank 0's time per step in the gradient all-reduce after backward (what
  // the overlap with backward did not hide) and the loss all-reduce.
  double communication_seconds_per_step = 0;
  std::vector<std::pair<std::string, std::string>> generations_before, generations_after;
  std::vector<std::string> paths;  // files and folders written
  std::string to_json() const;
};

// Called after each optimizer step's backward, before clipping, with the
// step about to complete (1-based) and the trainable parameters: to watch
// gradients, or to test what a bad batch does (a NaN gradient skips the step).
using GradientHook = std::function<void(int64_t step, const std::vector<at::Tensor>& params)>;

class Trainer {
 public:
  explicit Trainer(TrainConfig config);
  ~Trainer();
  // Sets everything up, evaluates, trains, evaluates again and saves the
  // final adapter; also writes summary.json into output_dir. A stop request
  // (stop_signals.h) ends training at the next step boundary: run() saves a
  // checkpoint there and throws Interrupted naming it.
  TrainSummary run();
  void set_gradient_hook(GradientHook hook);
  // Loads model, tokenizer, data and optimizer and creates output_dir
  // (run() calls it).
  void prepare();
  // The model, tokenizer and template (loaded on first use).
  ModelContext& context();
  const TrainConfig& config() const;
  // Mean label-token cross-entropy on the eval split (prepares first).
  double evaluate();

 private:
  struct State;
  std::unique_ptr<State> s_;
};

}  // namespace qlora::train
