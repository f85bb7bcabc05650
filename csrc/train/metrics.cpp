#include "train/metrics.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iomanip>
#include <nlohmann/json.hpp>
#include <sstream>

#include "qlora/io/atomic_file.h"
#include "util/fs.h"
#include "util/log.h"

namespace qlora::train {

void MetricsWriter::open(const std::string& output_dir) {
  path_ = output_dir + "/metrics.jsonl";
  svg_path_ = output_dir + "/loss_curve.svg";
  tty_ = isatty(STDERR_FILENO) != 0;
  train_.clear();
  eval_.clear();
  if (!fs::exists(path_)) return;
  std::ifstream in(path_);
  for (std::string line; std::getline(in, line);) {
    if (line.empty()) continue;
    const auto j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_discarded()) continue;
    if (j.contains("loss")) train_.emplace_back(j["step"].get<int64_t>(), j["loss"].get<double>());
    if (j.contains("eval_loss"))
      eval_.emplace_back(j["step"].get<int64_t>(), j["eval_loss"].get<double>());
  }
}

void MetricsWriter::append(const std::string& json_line) {
  std::ofstream out(path_, std::ios::app);
  out << json_line << "\n";
  out.close();
  if (!out && !append_failed_) {
    append_failed_ = true;
    log::warn("cannot append to " + path_ + " (disk full or folder removed?): " +
              "training goes on, metrics of later steps may be missing there");
  }
}

void MetricsWriter::train_step(int64_t step, int64_t total_steps, double loss, double lr,
                               double grad_norm, int64_t tokens, double seconds,
                               double tokens_per_second, int64_t log_every) {
  train_.emplace_back(step, loss);
  nlohmann::json j = {{"step", step},
                      {"loss", loss},
                      {"lr", lr},
                      {"grad_norm", grad_norm},
                      {"tokens", tokens},
                      {"seconds", seconds},
                      {"tokens_per_second", tokens_per_second}};
  append(j.dump());
  const double eta = (total_steps - step) * seconds;
  std::ostringstream line;
  line << "step " << step << "/" << total_steps << "  loss " << std::fixed << std::setprecision(4)
       << loss << "  lr " << std::scientific << std::setprecision(2) << lr << std::fixed
       << std::setprecision(0) << "  " << tokens_per_second << " tok/s  ETA " << eta << " s";
  if (tty_) {
    const int width = 24;
    const int filled = static_cast<int>(width * step / std::max<int64_t>(1, total_steps));
    std::fprintf(stderr, "\r[%s%s] %s\033[K", std::string(filled, '#').c_str(),
                 std::string(width - filled, '.').c_str(), line.str().c_str());
    if (step == total_steps) std::fprintf(stderr, "\n");
    std::fflush(stderr);
  } else if (log_every > 0 && (step % log_every == 0 || step == total_steps)) {
    log::info(line.str());
  }
}

void MetricsWriter::eval(int64_t step, double loss) {
  if (!std::isfinite(loss)) return;
  eval_.emplace_back(step, loss);
  append(nlohmann::json({{"step", step}, {"eval_loss", loss}, {"eval_perplexity", std::exp(loss)}})
             .dump());
  if (tty_) std::fprintf(stderr, "\n");
  std::ostringstream s;
  s << "eval at step " << step << ": loss " << std::fixed << std::setprecision(4) << loss
    << ", perplexity " << std::setprecision(2) << std::exp(loss);
  log::info(s.str());
  try {
    plot();
  } catch (const std::exception& e) {
    log::warn(std::string("loss curve not updated: ") + e.what());
  }
}

void MetricsWriter::checkpoint(int64_t step) {
  append(nlohmann::json({{"step", step}, {"checkpoint", true}}).dump());
}

void MetricsWriter::truncate_after(int64_t step) {
  std::vector<std::string> kept;
  if (fs::exists(path_)) {
    std::ifstream in(path_);
    for (std::string line; std::getline(in, line);) {
      const auto j = nlohmann::json::parse(line, nullptr, false);
      if (!j.is_discarded() && j.contains("step") && j["step"].get<int64_t>() <= step)
        kept.push_back(line);
    }
  }
  std::string text;
  for (const auto& l : kept) text += l + "\n";
  io::write_bytes_atomic(path_, text.data(), text.size());
  open(fs::parent(path_));
}

std::string MetricsWriter::plot() const {
  constexpr double W = 720, H = 400, L = 60, R = 20, T = 30, B = 40;
  double max_step = 1, lo = 1e300, hi = -1e300;
  for (const auto* series : {&train_, &eval_})
    for (const auto& [s, v] : *series) {
      max_step = std::max<double>(max_step, s);
      lo = std::min(lo, v);
      hi = std::max(hi, v);
    }
  if (lo > hi) lo = 0, hi = 1;
  if (hi - lo < 1e-9) hi = lo + 1;
  auto x = [&](double s) { return L + (W - L - R) * s / max_step; };
  auto y = [&](double v) { return T + (H - T - B) * (hi - v) / (hi - lo); };
  auto polyline = [&](const std::vector<std::pair<int64_t, double>>& pts, const char* color) {
    std::ostringstream s;
    s << "<polyline fill='none' stroke='" << color << "' stroke-width='2' points='";
    for (const auto& [st, v] : pts) s << x(st) << "," << y(v) << " ";
    s << "'/>\n";
    for (const auto& [st, v] : pts)
      if (pts.size() < 60)
        s << "<circle cx='" << x(st) << "' cy='" << y(v) << "' r='3' fill='" << color << "'/>\n";
    return s.str();
  };
  std::ostringstream svg;
  svg << std::fixed << std::setprecision(1);
  svg << "<svg xmlns='http://www.w3.org/2000/svg' width='" << W << "' height='" << H
      << "' font-family='sans-serif' font-size='12'>\n<rect width='100%' height='100%' "
         "fill='white'/>\n"
      << "<line x1='" << L << "' y1='" << H - B << "' x2='" << W - R << "' y2='" << H - B
      << "' stroke='black'/>\n"
      << "<line x1='" << L << "' y1='" << T << "' x2='" << L << "' y2='" << H - B
      << "' stroke='black'/>\n"
      << "<text x='" << W / 2 << "' y='" << H - 8
      << "' text-anchor='middle'>optimizer step</text>\n"
      << "<text x='14' y='" << H / 2 << "' transform='rotate(-90 14," << H / 2
      << ")' text-anchor='middle'>loss</text>\n";
  for (int i = 0; i <= 4; ++i) {
    const double v = lo + (hi - lo) * i / 4;
    svg << "<text x='" << L - 6 << "' y='" << y(v) + 4 << "' text-anchor='end'>"
        << std::setprecision(3) << v << "</text>\n"
        << std::setprecision(1);
  }
  svg << "<text x='" << W - R << "' y='" << H - B + 16 << "' text-anchor='end'>" << max_step
      << "</text>\n";
  svg << polyline(train_, "#1f77b4") << polyline(eval_, "#d62728");
  svg << "<text x='" << L + 10 << "' y='" << T - 10 << "' fill='#1f77b4'>train loss</text>\n"
      << "<text x='" << L + 110 << "' y='" << T - 10
      << "' fill='#d62728'>eval loss</text>\n</svg>\n";
  const std::string text = svg.str();
  io::write_bytes_atomic(svg_path_, text.data(), text.size());
  return svg_path_;
}

}  // namespace qlora::train
