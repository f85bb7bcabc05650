// A torchrun-like launcher inside our binary: `qlora train CONFIG
// --nproc-per-node N` starts N workers (this executable again, with the same
// arguments minus the launcher's) with RANK, WORLD_SIZE, LOCAL_RANK,
// LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT set, as torchrun's static
// rendezvous does, so `--nnodes`/`--node-rank` runs span machines.
#pragma once

#include <chrono>
#include <string>
#include <vector>

namespace qlora::dist {

struct LaunchOptions {
  int nproc_per_node = 1;
  int nnodes = 1;
  int node_rank = 0;
  std::string master_addr = "127.0.0.1";
  int master_port = 0;  // 0: a free port on master_addr (single node only)
  // After the first worker fails, how long the others get to exit on their
  // own (they see the failure as a collective error, at once for a dead peer,
  // after the collective timeout for a hung one) before SIGKILL.
  std::chrono::seconds grace{30};
  std::vector<std::string> worker_argv;  // argv[0] is the program to run
};

// Runs the workers to the end. Returns 0 when all succeed; else the exit
// code of the first worker that failed (128 + signal for a killed one), with
// a message on stderr naming it. SIGINT/SIGTERM are passed on to the workers
// once; a second one kills them and returns 128 + signal at once.
int launch_workers(const LaunchOptions& options);

// A TCP port on `address` that nothing listens on right now.
int free_port(const std::string& address);

}  // namespace qlora::dist
