// What a person watching a run reads: a progress line (live on a terminal,
// plain lines otherwise), metrics.jsonl, and a loss-curve SVG beside it.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace qlora::train {

class MetricsWriter {
 public:
  void open(const std::string& output_dir);
  void train_step(int64_t step, int64_t total_steps, double loss, double lr, double grad_norm,
                  int64_t tokens, double seconds, double tokens_per_second, int64_t log_every);
  void eval(int64_t step, double loss);
  void checkpoint(int64_t step);
  // On resume: forget what came after the checkpoint, so the file and the
  // curve read as one uninterrupted run.
  void truncate_after(int64_t step);
  const std::string& path() const { return path_; }
  // Writes loss_curve.svg (train and eval loss against step); returns its path.
  std::string plot() const;

 private:
  void append(const std::string& json_line);
  std::string path_, svg_path_;
  bool tty_ = false;
  bool append_failed_ = false;  // warned once: metrics are not worth stopping a run for
  std::vector<std::pair<int64_t, double>> train_, eval_;
};

}  // namespace qlora::train
