// A model ready to use, without any training state: the LLaMA model (4-bit
// base + LoRA layers as the config says), its tokenizer, the prompt
// template and the device. `qlora eval`, `generate` and `export` run on
// one; the Trainer owns one and adds data, optimizer and checkpoints.
#pragma once

#include <c10/core/Device.h>

#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "qlora/data/dataset.h"
#include "qlora/models/llama.h"
#include "qlora/nn/lora_config.h"
#include "qlora/tokenizers/tokenizer.h"
#include "qlora/train/config.h"

namespace qlora::train {

struct ModelContext {
  models::LlamaForCausalLM model{nullptr};
  std::unique_ptr<tokenizers::Tokenizer> tokenizer;
  data::PromptTemplate prompt_template;
  c10::Device device{c10::kCPU};
  nn::LoRAConfig lora;           // what the LoRA layers were built with
  std::string model_path;        // config.model.path
  std::string tokenizer_source;  // config.model.tokenizer, else the model path

  // Loads the model and tokenizer config.model names, with config.lora's
  // layers, or, given `adapter` (a PEFT folder), with the adapter's LoRA
  // config and then its weights. Sets threads and seeds as training would.
  static ModelContext load(const TrainConfig& config,
                           const std::optional<std::string>& adapter = std::nullopt);

  // Replaces the LoRA weights with a saved PEFT adapter built with `lora`.
  void load_adapter(const std::string& dir);

  // Mean label-token cross-entropy over `eval` (NaN when it is empty), in
  // eval mode and without gradients; the model is left in training mode.
  double evaluate(const std::shared_ptr<const data::Dataset>& eval, int64_t micro_batch_size);
  // The summed label-token loss and the label-token count of shard `shard`
  // of `num_shards` (data-parallel evaluation: the ranks add them up).
  std::pair<double, int64_t> evaluate_sums(const std::shared_ptr<const data::Dataset>& eval,
                                           int64_t micro_batch_size, int64_t shard = 0,
                                           int64_t num_shards = 1);

  // Greedy completions of instructions rendered with the prompt template.
  std::vector<std::pair<std::string, std::string>> generate(const std::vector<std::string>& prompts,
                                                            int64_t max_new_tokens);
};

// The training and evaluation examples a TrainConfig names (data.train,
// data.eval or data.eval_split, data.eval_max_examples), tokenized with
// `tokenizer`; problems are logged as warnings. With `need_train` false and
// data.eval set, the training file is not read.
struct DataSplits {
  std::shared_ptr<data::Dataset> train, eval;
};
DataSplits load_data_splits(const TrainConfig& config, const tokenizers::Tokenizer& tokenizer,
                            bool need_train = true);

}  // namespace qlora::train
