// The QLoRA trainer: loads the model (4-bit base + LoRA), tokenizer and
// data named by a TrainConfig, trains with gradient accumulation normalised
// by label tokens, clipping, an LR schedule and PagedAdamW, evaluates, and
// writes atomic checkpoints from which `resume: auto` continues exactly.
#pragma once

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>

#include "qlora/models/llama.h"
#include "qlora/nn/lora_config.h"
#include "qlora/train/config.h"

namespace qlora::train {

struct TrainSummary {
  double eval_loss_before = 0, eval_loss_after = 0;
  double tokens_per_second = 0;  // training tokens (inputs) per second of the training loop
  int64_t peak_rss_bytes = 0;
  double wall_seconds = 0;
  int64_t steps = 0, skipped_steps = 0;
  int64_t resumed_from_step = 0;
  std::vector<std::pair<std::string, std::string>> generations_before, generations_after;
  std::vector<std::string> paths;  // files and folders written
  std::string to_json() const;
};

class Trainer {
 public:
  explicit Trainer(TrainConfig config);
  ~Trainer();
  // Sets everything up, evaluates, trains, evaluates again and saves the
  // final adapter; also writes summary.json into output_dir.
  TrainSummary run();
  // Loads model, tokenizer, data and optimizer (run() calls it).
  void prepare();
  // Replaces the LoRA weights with a saved PEFT adapter.
  void load_adapter(const std::string& dir);
  // The loaded model (loads it first) and the LoRA config it was built with.
  models::LlamaForCausalLM& model();
  const nn::LoRAConfig& lora_config() const;
  const TrainConfig& config() const;
  // Mean label-token cross-entropy on the eval split.
  double evaluate();
  // Greedy completions of instructions rendered with the data template.
  std::vector<std::pair<std::string, std::string>> generate(const std::vector<std::string>& prompts,
                                                            int64_t max_new_tokens);

 private:
  struct State;
  std::unique_ptr<State> s_;
};

// Token-level cross-entropy summed over the label tokens of `labels`
// (unshifted, -100 ignored), as Hugging Face's causal LM loss before its
// division: dividing by the label tokens of a whole accumulation window
// makes N micro-batches equal one big batch.
at::Tensor summed_causal_lm_loss(const at::Tensor& logits, const at::Tensor& labels);
int64_t count_label_tokens(const at::Tensor& labels);

}  // namespace qlora::train
