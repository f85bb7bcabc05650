// Learning-rate schedules with linear warm-up, as transformers defines them
// (get_constant_schedule_with_warmup, get_linear_schedule_with_warmup,
// get_cosine_schedule_with_warmup).
#pragma once

#include <cstdint>
#include <string>

namespace qlora::train {

class LRSchedule {
 public:
  LRSchedule(std::string kind, double base_lr, int64_t warmup_steps, int64_t total_steps);
  // Learning rate for optimizer step `step` (0-based: the first update uses lr(0)).
  double lr(int64_t step) const;

 private:
  std::string kind_;
  double base_lr_;
  int64_t warmup_, total_;
};

}  // namespace qlora::train
