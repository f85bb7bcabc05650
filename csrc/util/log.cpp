#include "util/log.h"

#include <spdlog/sinks/basic_file_sink.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

namespace qlora::log {

namespace {
std::shared_ptr<spdlog::logger>& logger() {
  static std::shared_ptr<spdlog::logger> l = [] {
    auto sink = std::make_shared<spdlog::sinks::stderr_color_sink_mt>();
    auto lg = std::make_shared<spdlog::logger>("qlora", sink);
    lg->set_pattern("[%H:%M:%S] %^%l%$ %v");
    lg->flush_on(spdlog::level::info);
    return lg;
  }();
  return l;
}

std::shared_ptr<spdlog::sinks::sink> file_sink(const std::string& path) {
  auto sink = std::make_shared<spdlog::sinks::basic_file_sink_mt>(path, /*truncate=*/false);
  sink->set_pattern("[%Y-%m-%d %H:%M:%S] %l %v");
  return sink;
}
}  // namespace

void info(const std::string& message) { logger()->info(message); }
void warn(const std::string& message) { logger()->warn(message); }
void error(const std::string& message) { logger()->error(message); }

void add_file(const std::string& path) { logger()->sinks().push_back(file_sink(path)); }

void reopen_files() {
  for (auto& sink : logger()->sinks()) {
    const auto* file = dynamic_cast<spdlog::sinks::basic_file_sink_mt*>(sink.get());
    if (file == nullptr) continue;
    const std::string path = file->filename();
    sink = file_sink(path);
  }
}

void set_worker_rank(int rank) {
  if (rank == 0) return;
  logger()->set_pattern("[%H:%M:%S] [rank " + std::to_string(rank) + "] %^%l%$ %v");
  logger()->set_level(spdlog::level::warn);
}

}  // namespace qlora::log
