#include "qlora/dist/launcher.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <stdexcept>
#include <thread>

namespace qlora::dist {

namespace {

// Shared with the signal handler: the workers' pids and how many signals came.
constexpr int kMaxWorkers = 1024;
pid_t g_pids[kMaxWorkers];
std::atomic<int> g_count{0};
std::atomic<int> g_signals{0};
std::atomic<int> g_last_signal{0};

void forward_signal(int sig) {
  const int n = g_signals.fetch_add(1) + 1;
  g_last_signal = sig;
  for (int i = 0; i < g_count; ++i)
    if (g_pids[i] > 0) kill(g_pids[i], n == 1 ? sig : SIGKILL);
}

std::string describe_status(int status) {
  if (WIFEXITED(status)) return "exited with code " + std::to_string(WEXITSTATUS(status));
  if (WIFSIGNALED(status))
    return std::string("was killed by signal ") + std::to_string(WTERMSIG(status)) + " (" +
           strsignal(WTERMSIG(status)) + ")";
  return "stopped";
}

int exit_code_of(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return 1;
}

[[noreturn]] void exec_worker(const LaunchOptions& o, int local_rank, int port) {
  setpgid(0, 0);  // the terminal's Ctrl-C reaches the launcher alone, which passes it on once
  prctl(PR_SET_PDEATHSIG, SIGTERM);  // a launcher killed outright takes its workers along
  const int world = o.nnodes * o.nproc_per_node;
  const int rank = o.node_rank * o.nproc_per_node + local_rank;
  setenv("RANK", std::to_string(rank).c_str(), 1);
  setenv("WORLD_SIZE", std::to_string(world).c_str(), 1);
  setenv("LOCAL_RANK", std::to_string(local_rank).c_str(), 1);
  setenv("LOCAL_WORLD_SIZE", std::to_string(o.nproc_per_node).c_str(), 1);
  setenv("MASTER_ADDR", o.master_addr.c_str(), 1);
  setenv("MASTER_PORT", std::to_string(port).c_str(), 1);
  // As torchrun: split the cores between the local workers unless told otherwise.
  if (!std::getenv("OMP_NUM_THREADS")) {
    const long cores = sysconf(_SC_NPROCESSORS_ONLN);
    setenv("OMP_NUM_THREADS", std::to_string(std::max(1L, cores / o.nproc_per_node)).c_str(), 1);
  }
  std::vector<char*> argv;
  for (const auto& a : o.worker_argv) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  execv("/proc/self/exe", argv.data());
  std::cerr << "qlora launcher: cannot start a worker: " << std::strerror(errno) << "\n";
  _exit(127);
}

}  // namespace

int free_port(const std::string& address) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) throw std::runtime_error(std::string("free_port: socket: ") + std::strerror(errno));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = 0;
  if (inet_pton(AF_INET, address.c_str(), &a.sin_addr) != 1) a.sin_addr.s_addr = htonl(INADDR_ANY);
  socklen_t len = sizeof(a);
  if (bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0 ||
      getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
    const std::string why = std::strerror(errno);
    close(fd);
    throw std::runtime_error("free_port: no free port on " + address + ": " + why);
  }
  close(fd);
  return ntohs(a.sin_port);
}

int launch_workers(const LaunchOptions& o) {
  if (o.nproc_per_node < 1 || o.nproc_per_node > kMaxWorkers)
    throw std::invalid_argument("--nproc-per-node must be in [1, " + std::to_string(kMaxWorkers) +
                                "], got " + std::to_string(o.nproc_per_node));
  if (o.nnodes < 1 || o.node_rank < 0 || o.node_rank >= o.nnodes)
    throw std::invalid_argument("--node-rank must be in [0, --nnodes)");
  if (o.worker_argv.empty()) throw std::invalid_argument("launch_workers: no worker command");
  int port = o.master_port;
  if (port == 0) {
    if (o.nnodes > 1) throw std::invalid_argument("--master-port is required with --nnodes > 1");
    port = free_port(o.master_addr);
  }
  g_count = 0;
  g_signals = 0;
  struct sigaction sa {
  }, old_int{}, old_term{};
  sa.sa_handler = forward_signal;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, &old_int);
  sigaction(SIGTERM, &sa, &old_term);
  std::cerr << "qlora launcher: " << o.nproc_per_node << " worker(s) on node " << o.node_rank
            << " of " << o.nnodes << ", rendezvous at " << o.master_addr << ":" << port << "\n";
  for (int r = 0; r < o.nproc_per_node; ++r) {
    const pid_t pid = fork();
    if (pid < 0) {
      forward_signal(SIGKILL);
      throw std::runtime_error(std::string("launcher: fork failed: ") + std::strerror(errno));
    }
    if (pid == 0) exec_worker(o, r, port);
    g_pids[r] = pid;
    g_count = r + 1;
  }
  int live = o.nproc_per_node, result = 0;
  std::chrono::steady_clock::time_point kill_at{};
  bool failing = false;
  while (live > 0) {
    int status = 0;
    const pid_t pid = waitpid(-1, &status, failing ? WNOHANG : 0);
    if (pid < 0 && errno == EINTR) continue;
    if (pid < 0) break;
    if (pid == 0) {  // failing: wait out the grace period, then kill
      if (std::chrono::steady_clock::now() >= kill_at) {
        for (int i = 0; i < o.nproc_per_node; ++i)
          if (g_pids[i] > 0) kill(g_pids[i], SIGKILL);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      continue;
    }
    int local = -1;
    for (int i = 0; i < o.nproc_per_node; ++i)
      if (g_pids[i] == pid) local = i;
    if (local < 0) continue;
    g_pids[local] = -1;
    --live;
    const int code = exit_code_of(status);
    if (code != 0 && result == 0) result = code;
    // Stopping on a signal, each worker saves and exits by itself (130/143):
    // another signal now would end a save half way.
    const int rank = o.node_rank * o.nproc_per_node + local;
    if (code != 0 && !failing && !g_signals) {
      failing = true;
      kill_at = std::chrono::steady_clock::now() + o.grace;
      // No signal to the others now: their next collective fails on the dead
      // peer's closed connections (or times out on a hung one) and they exit
      // with a message naming it; a SIGTERM would race that exit and end a
      // worker silently. Whatever is left after the grace period is killed.
      std::cerr << "qlora launcher: worker rank " << rank << " (pid " << pid << ") "
                << describe_status(status) << "; the others get " << o.grace.count()
                << " s to stop\n";
    } else if (failing) {
      std::cerr << "qlora launcher: worker rank " << rank << " (pid " << pid << ") "
                << describe_status(status) << "\n";
    }
  }
  sigaction(SIGINT, &old_int, nullptr);
  sigaction(SIGTERM, &old_term, nullptr);
  if (g_signals > 1) return 128 + g_last_signal;
  return result;
}

}  // namespace qlora::dist
