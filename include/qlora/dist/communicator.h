// Data-parallel communication on torch.distributed's c10d, set up as torchrun
// sets it up: a TCPStore rendezvous at MASTER_ADDR:MASTER_PORT and a Gloo
// (CPU tensors) or NCCL (CUDA tensors) process group from the LibTorch we
// link. The c10d types stay behind this interface, so code built on it needs
// neither gloo's nor NCCL's headers.
#pragma once

#include <ATen/core/Tensor.h>

#include <chrono>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace qlora::dist {

// Where this process sits in the job: torchrun's variables.
struct WorldInfo {
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;

  // From RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; nullopt
  // when WORLD_SIZE is unset (a plain single process). Throws
  // std::invalid_argument naming the variable that is missing or malformed.
  static std::optional<WorldInfo> from_environment();
};

// A collective that failed: a peer died (its connection closed) or hung (the
// timeout passed). The message names this rank, the operation and the cause.
class CollectiveError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A collective in flight; wait() blocks until it is done (throws CollectiveError).
class PendingCollective {
 public:
  PendingCollective();
  ~PendingCollective();
  PendingCollective(PendingCollective&&) noexcept;
  PendingCollective& operator=(PendingCollective&&) noexcept;
  void wait();

 private:
  friend class Communicator;
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

class Communicator {
 public:
  // Rendezvous of world.world_size processes (rank 0 hosts the store) and a
  // process group of `backend` ("gloo" or "nccl"). Every store operation and
  // collective gives up after `timeout`.
  static std::unique_ptr<Communicator> connect(const WorldInfo& world, const std::string& backend,
                                               std::chrono::milliseconds timeout);
  ~Communicator();
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  int rank() const;
  int world_size() const;
  const std::string& backend() const;

  // Sums `t` over the ranks in place; every rank ends with the same bits.
  PendingCollective all_reduce_sum_async(at::Tensor& t);
  void all_reduce_sum(at::Tensor& t);
  void all_reduce_max(at::Tensor& t);
  // Rank `root`'s `t` into every rank's `t`.
  void broadcast(at::Tensor& t, int root);
  // Every rank's `t` (same shape everywhere), in rank order.
  std::vector<at::Tensor> all_gather(const at::Tensor& t);
  void barrier();

 private:
  Communicator();
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// "gloo" or "nccl" for training.distributed.backend "auto" | "gloo" | "nccl"
// on `device_type` ("cpu" or "cuda"); throws std::invalid_argument for a
// backend this build or device cannot run.
std::string resolve_backend(const std::string& configured, const std::string& device_type);

// Whether this build has the NCCL process group (CUDA builds) and the Gloo one.
bool has_nccl();
bool has_gloo();

}  // namespace qlora::dist
