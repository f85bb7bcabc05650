#include "qlora/train/lr_schedule.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace qlora::train {

LRSchedule::LRSchedule(std::string kind, double base_lr, int64_t warmup_steps, int64_t total_steps)
    : kind_(std::move(kind)), base_lr_(base_lr), warmup_(warmup_steps), total_(total_steps) {
  if (kind_ != "constant" && kind_ != "linear" && kind_ != "cosine")
    throw std::invalid_argument("unknown LR schedule \"" + kind_ + "\" (constant, linear, cosine)");
}

double LRSchedule::lr(int64_t step) const {
  if (step < warmup_) return base_lr_ * static_cast<double>(step) / std::max<int64_t>(1, warmup_);
  if (kind_ == "constant") return base_lr_;
  const double progress =
      static_cast<double>(step - warmup_) / std::max<int64_t>(1, total_ - warmup_);
  if (kind_ == "linear") return base_lr_ * std::max(0.0, 1.0 - progress);
  return base_lr_ * std::max(0.0, 0.5 * (1.0 + std::cos(M_PI * progress)));
}

}  // namespace qlora::train
