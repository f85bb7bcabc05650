// What a training run will need in memory, computed from the config and the
// model's metadata alone (config.json, the GGUF header, safetensors headers)
// before anything is loaded: `qlora plan CONFIG` and `qlora train --dry-run`.
//
// The weights, the adapter, its gradients and the optimizer state are what
// the loader and PagedAdamW allocate, to the byte (tested against a loaded
// model). Activations are an estimate from the model's shapes (see
// activation_bytes in the .cpp), checked against measured peaks in
// benchmarks/RESULTS.md.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "qlora/train/config.h"

namespace qlora::train {

struct MemoryPlan {
  struct Item {
    std::string name;
    int64_t bytes = 0;
    std::string detail;
  };
  std::string model;  // one line: the model, its format and shapes
  std::vector<Item> items;
  int64_t weights_bytes = 0;  // frozen base + dense weights + adapter parameters
  int64_t adapter_parameters = 0;
  int64_t gradient_bytes = 0;
  int64_t optimizer_bytes = 0;
  int64_t activation_bytes = 0;  // one micro-batch, as configured
  int64_t activation_bytes_without_checkpointing = 0;
  int64_t activation_bytes_with_checkpointing = 0;
  int64_t peak_bytes = 0;        // weights + gradients + optimizer + activations
  int64_t available_bytes = -1;  // free memory of the device (-1: unknown)
  std::string device;            // "CPU RAM (MemAvailable)"
  bool fits() const { return available_bytes < 0 || peak_bytes <= available_bytes; }
};

// Reads only metadata; errors (c10::Error) name the file and key.
MemoryPlan plan_memory(const TrainConfig& config);

// A table for people: one line per item, the total and the verdict.
std::string format_memory_plan(const MemoryPlan& plan);

}  // namespace qlora::train
