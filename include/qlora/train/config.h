// The trainer's configuration: a YAML file (configs/*.yaml) plus
// `--set section.key=value` overrides. Unknown or mistyped keys are errors
// that list the valid ones; the resolved config is written with every run
// and checkpoint.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "qlora/nn/lora_config.h"

namespace qlora::train {

struct TrainConfig {
  struct Model {
    std::string path;  // HF folder, bnb-4bit folder or .gguf file
    std::string format = "auto";
    std::string tokenizer;  // default: the model path
    bool quantize = true;   // QLoRA (4-bit base) or plain LoRA
    // GGUF models: "requantize" (dequantise, then NF4/FP4 per quantize) or
    // "gguf-native" (each Linear but lm_head keeps the file's ggml blocks,
    // Q4_0 ... Q6_K, never re-quantised; quantize/quant_type/blocksize/
    // double_quant are then unused).
    std::string base_format = "requantize";
    std::string quant_type = "nf4";
    int64_t blocksize = 64;
    bool double_quant = true;
    // auto: bfloat16 on a GPU with bf16 compute (sm_80+), else float32.
    std::string compute_dtype = "auto";  // auto | float32 | bfloat16 | float16
  } model;
  // The LoRA layers, as keys "lora.<field>" of nn::LoRAConfig (r, alpha,
  // dropout, target_modules, target_regex, exclude_modules, use_rslora,
  // use_dora, bias); training defaults: dropout 0.05, every linear layer.
  nn::LoRAConfig lora = default_lora();
  struct Data {
    std::string train;
    std::string eval;  // optional; else eval_split of train
    std::string format = "auto";
    std::string template_name = "alpaca";  // key "template"
    int64_t max_length = 512;
    bool packing = false;
    bool shuffle = true;  // a new order every epoch from training.seed; false: file order
    double eval_split = 0.0;
    int64_t eval_max_examples = 0;  // 0: all
    bool strict = true;
  } data;
  struct Training {
    int64_t epochs = 1;
    int64_t max_steps = -1;  // > 0 overrides epochs
    int64_t micro_batch_size = 4;
    int64_t gradient_accumulation_steps = 1;
    double lr = 2e-4;
    std::string scheduler = "cosine";  // constant | linear | cosine
    int64_t warmup_steps = 0;
    double weight_decay = 0.0;
    double max_grad_norm = 1.0;                  // <= 0: no clipping
    std::string optimizer = "paged_adamw_8bit";  // paged_adamw_32bit | paged_adamw_8bit | adamw
    bool gradient_checkpointing = false;
    // With gradient_checkpointing: keep the outputs of each layer's frozen
    // 4-bit matmuls and recompute only the rest (about 1/3 fewer FLOPs for
    // ~(2 * hidden + q/k/v + 2 * intermediate) values per token and layer);
    // gradients are identical. See LlamaModelImpl::set_gradient_checkpointing.
    bool selective_recompute = false;
    int64_t seed = 42;
    int64_t eval_every = 0;  // 0: only before and after training
    int64_t save_every = 0;  // 0: only at the end
    int64_t keep_last = 2;
    int64_t log_every = 1;
    int64_t max_consecutive_nonfinite = 5;
    int64_t threads = 0;  // 0: the machine's cores
    // auto: the first CUDA device when one is visible, else the CPU; the
    // model, LoRA weights, optimizer state, batches, eval and generation all
    // live there (include/qlora/train/device.h).
    std::string device = "auto";  // auto | cpu | cuda | cuda:N
    // Data parallelism (docs/DISTRIBUTED.md): used when a launcher set
    // WORLD_SIZE (qlora train --nproc-per-node N, or torchrun).
    struct Distributed {
      std::string backend = "auto";  // auto (NCCL on CUDA, Gloo on the CPU) | gloo | nccl
      // A collective or the rendezvous waiting longer than this fails the
      // run: the limit on how long a dead or hung peer can stall the others.
      double timeout_seconds = 1800;
      double bucket_mb = 4;  // gradient bucket size for the overlapped all-reduce
      // ZeRO-1: each rank keeps the optimizer state of its share of the LoRA
      // parameters only, updates those and broadcasts them; checkpoints still
      // hold the whole state (gathered to rank 0), so any rank count resumes.
      bool shard_optimizer = false;
    } distributed;
  } training;
  struct Generation {
    std::vector<std::string> prompts;  // instructions shown before and after training
    int64_t max_new_tokens = 48;
  } generation;
  std::string output_dir = "runs/qlora";
  std::string resume = "auto";  // auto | none | a checkpoint directory

  // Parses `path`, then applies "key=value" overrides (YAML values, so
  // lists read as [a, b]). Errors name the file, the key and what was
  // expected, or list the valid keys.
  static TrainConfig from_yaml_file(const std::string& path,
                                    const std::vector<std::string>& overrides = {});
  static TrainConfig from_yaml_string(const std::string& text,
                                      const std::vector<std::string>& overrides = {},
                                      const std::string& source = "<string>");
  std::string to_yaml() const;
  static std::vector<std::string> valid_keys();
  static nn::LoRAConfig default_lora();
};

}  // namespace qlora::train
