#include "qlora/train/stop_signals.h"

#include <signal.h>
#include <string.h>
#include <unistd.h>

#include <atomic>
#include <string>
#include <utility>

namespace qlora::train {
namespace {

// Lock-free, so the handler may touch it.
std::atomic<int> g_pending{0};
struct sigaction g_previous_int, g_previous_term;

void on_stop_signal(int sig) {
  int expected = 0;
  if (g_pending.compare_exchange_strong(expected, sig)) {
    static const char kMessage[] =
        "\nqlora: stop requested: saving a checkpoint at the end of this step "
        "(signal again to exit at once)\n";
    // write(2) is async-signal-safe; there is nothing to do if it fails.
    [[maybe_unused]] const ssize_t n = ::write(STDERR_FILENO, kMessage, sizeof(kMessage) - 1);
    return;
  }
  _exit(128 + sig);  // the second signal: no checkpoint, no destructors
}

}  // namespace

StopSignalHandler::StopSignalHandler() {
  static_assert(std::atomic<int>::is_always_lock_free);
  clear_stop_request();
  struct sigaction sa;
  memset(&sa, 0, sizeof(sa));
  sa.sa_handler = on_stop_signal;
  sigemptyset(&sa.sa_mask);
  // SA_RESTART: a read(2) in the middle of loading data resumes instead of failing with EINTR.
  sa.sa_flags = SA_RESTART;
  sigaction(SIGINT, &sa, &g_previous_int);
  sigaction(SIGTERM, &sa, &g_previous_term);
}

StopSignalHandler::~StopSignalHandler() {
  sigaction(SIGINT, &g_previous_int, nullptr);
  sigaction(SIGTERM, &g_previous_term, nullptr);
}

int pending_stop_signal() { return g_pending.load(); }

void request_stop(int signal_number) {
  int expected = 0;
  g_pending.compare_exchange_strong(expected, signal_number);
}

void clear_stop_request() { g_pending.store(0); }

namespace {
std::string interrupted_message(int sig, const std::string& checkpoint) {
  const char* name = sig == SIGINT ? "SIGINT" : sig == SIGTERM ? "SIGTERM" : "a signal";
  if (checkpoint.empty())
    return std::string("interrupted by ") + name + " before the first step: nothing to save";
  return std::string("interrupted by ") + name + ": saved " + checkpoint +
         "; run again with resume: auto to continue from it";
}
}  // namespace

Interrupted::Interrupted(int signal_number, std::string checkpoint)
    : std::runtime_error(interrupted_message(signal_number, checkpoint)),
      signal_(signal_number),
      checkpoint_(std::move(checkpoint)) {}

}  // namespace qlora::train
