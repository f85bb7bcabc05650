// Training checkpoints: output_dir/checkpoint-<step>/ holding the PEFT
// adapter, optimizer.pt (optimizer state + the generators' state),
// config.yaml and trainer_state.json. A checkpoint is written in a
// temporary folder and renamed into place, so one that exists with its
// trainer_state.json is complete; a killed run leaves at most a temporary
// folder, which the next save removes.
#pragma once

#include <torch/optim/optimizer.h>

#include <optional>
#include <stdexcept>
#include <string>

#include "qlora/data/data_loader.h"
#include "qlora/models/llama.h"
#include "qlora/nn/lora_config.h"

namespace qlora::train::detail {

// Counters of the training loop that a resume continues from.
struct LoopState {
  int64_t step = 0, total_steps = 0, skipped_steps = 0, consecutive_nonfinite = 0;
  int64_t trained_tokens = 0;
  double train_seconds = 0;
  std::string data_state_json;  // data::LoaderState::to_json()
};

// What a checkpoint holds besides the loop state.
struct CheckpointParts {
  models::LlamaForCausalLM& model;
  const nn::LoRAConfig& lora;
  const std::string& base_model;  // written into adapter_config.json
  torch::optim::Optimizer& optimizer;
  const std::string& config_yaml;
  c10::Device device = c10::kCPU;  // where training runs: states load onto it
};

std::string checkpoint_name(int64_t step);

// A checkpoint that could not be written (disk full, read-only folder...):
// the message names it, the cause, and the checkpoint a resume would use.
class CheckpointError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Writes output_dir/checkpoint-<state.step>, replacing one of the same step;
// returns its path. Throws CheckpointError, leaving no partial folder.
std::string save_checkpoint(const std::string& output_dir, const CheckpointParts& parts,
                            const LoopState& state);

// Loads adapter weights and optimizer state into `parts`, restores the
// generators, and returns the loop state.
LoopState load_checkpoint(const std::string& dir, const CheckpointParts& parts);

// The complete checkpoint of the highest step in output_dir, if any.
std::optional<std::string> find_latest_checkpoint(const std::string& output_dir);

// Keeps the newest `keep_last` complete checkpoints; removes incomplete
// ones and the temporary folders of interrupted saves.
void prune_checkpoints(const std::string& output_dir, int64_t keep_last);

}  // namespace qlora::train::detail
