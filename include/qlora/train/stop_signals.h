// Ctrl-C and a scheduler's SIGTERM during a fine-tune: the first signal asks
// the trainer to stop at the next step boundary, after it has written a
// checkpoint (Trainer::run then throws Interrupted); a second signal of
// either kind ends the process at once, as users expect of a second Ctrl-C.
#pragma once

#include <stdexcept>
#include <string>

namespace qlora::train {

// While one is alive, SIGINT and SIGTERM are caught as described above; the
// previous dispositions come back when it is destroyed. Not nestable.
class StopSignalHandler {
 public:
  StopSignalHandler();
  ~StopSignalHandler();
  StopSignalHandler(const StopSignalHandler&) = delete;
  StopSignalHandler& operator=(const StopSignalHandler&) = delete;
};

// The signal of a stop request not yet acted on, or 0. Async-signal-safe.
int pending_stop_signal();
// What the handler does on the first signal; also for programs that stop a
// run from another thread (a GUI, a time limit) and for tests.
void request_stop(int signal_number);
void clear_stop_request();

// Thrown by Trainer::run when it stopped for a signal after saving `checkpoint`.
class Interrupted : public std::runtime_error {
 public:
  Interrupted(int signal_number, std::string checkpoint);
  int signal_number() const { return signal_; }
  const std::string& checkpoint() const { return checkpoint_; }
  // The shell's convention for a process ended by a signal: 130 for SIGINT, 143 for SIGTERM.
  int exit_code() const { return 128 + signal_; }

 private:
  int signal_;
  std::string checkpoint_;
};

}  // namespace qlora::train
