// c10d from C++: TCPStore + ProcessGroupGloo (+ ProcessGroupNCCL in CUDA
// builds, dist/nccl_backend.cpp). ProcessGroupGloo.hpp needs gloo's headers,
// which the torch wheel does not ship: they come from Debian's libgloo-dev
// (headers only; the gloo code itself is the one inside libtorch_cpu, never
// Debian's libgloo). Only Options::create_default, the constructor and the
// Backend interface are used here, and ProcessGroupGloo's own layout holds
// gloo types only behind shared_ptr, so the older header snapshot and the
// library agree on everything this file touches (tests/cpp/dist prove it:
// construction, collectives, teardown, repeated).
#include "qlora/dist/communicator.h"

#include <c10/util/Exception.h>
#ifdef QLORA_HAVE_GLOO
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#endif
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <signal.h>

#include <cstdlib>
#include <utility>

#include "dist/nccl_backend.h"

namespace qlora::dist {

namespace {

int env_int(const char* name, bool required, int fallback, int lo, int hi) {
  const char* v = std::getenv(name);
  if (!v || !*v) {
    if (required)
      throw std::invalid_argument(std::string("distributed training: the environment variable ") +
                                  name + " is not set (WORLD_SIZE is, so a launcher started us)");
    return fallback;
  }
  char* end = nullptr;
  const long x = std::strtol(v, &end, 10);
  if (*end != '\0' || x < lo || x > hi)
    throw std::invalid_argument(std::string("distributed training: ") + name + "=\"" + v +
                                "\" is not an integer in [" + std::to_string(lo) + ", " +
                                std::to_string(hi) + "]");
  return static_cast<int>(x);
}

std::string describe(const std::exception& e) {
  if (const auto* c = dynamic_cast<const c10::Error*>(&e)) return c->what_without_backtrace();
  return e.what();
}

}  // namespace

std::optional<WorldInfo> WorldInfo::from_environment() {
  if (!std::getenv("WORLD_SIZE")) return std::nullopt;
  WorldInfo w;
  w.world_size = env_int("WORLD_SIZE", true, 1, 1, 1 << 20);
  w.rank = env_int("RANK", true, 0, 0, w.world_size - 1);
  w.local_rank = env_int("LOCAL_RANK", false, w.rank, 0, w.world_size - 1);
  if (const char* a = std::getenv("MASTER_ADDR"); a && *a)
    w.master_addr = a;
  else if (w.world_size > 1)
    throw std::invalid_argument("distributed training: MASTER_ADDR is not set");
  w.master_port = env_int("MASTER_PORT", w.world_size > 1, 29500, 1, 65535);
  return w;
}

struct PendingCollective::Impl {
  c10::intrusive_ptr<c10d::Work> work;
  std::string what;
};

PendingCollective::PendingCollective() = default;
PendingCollective::~PendingCollective() = default;
PendingCollective::PendingCollective(PendingCollective&&) noexcept = default;
PendingCollective& PendingCollective::operator=(PendingCollective&&) noexcept = default;

void PendingCollective::wait() {
  if (!impl_ || !impl_->work) return;
  try {
    impl_->work->wait();
  } catch (const std::exception& e) {
    throw CollectiveError(impl_->what + " failed: " + describe(e) +
                          " (another worker died, hung past the timeout, or was stopped)");
  }
  impl_->work.reset();
}

struct Communicator::Impl {
  int rank = 0, world_size = 1;
  std::string backend_name;
  std::chrono::milliseconds timeout{0};
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;

  std::string label(const char* op) const {
    return "rank " + std::to_string(rank) + " of " + std::to_string(world_size) + ": " + op;
  }
  // Runs a collective to completion, turning any failure into a CollectiveError.
  template <typename F>
  void run(const char* op, F&& start) {
    try {
      c10::intrusive_ptr<c10d::Work> w = start();
      w->wait();
    } catch (const std::exception& e) {
      throw CollectiveError(label(op) + " failed: " + describe(e) +
                            " (another worker died, hung past the timeout, or was stopped)");
    }
  }
};

Communicator::Communicator() : impl_(std::make_unique<Impl>()) {}
Communicator::~Communicator() {
  // Teardown with dead peers must not throw out of a destructor.
  try {
    impl_->backend.reset();
    impl_->store.reset();
  } catch (...) {
  }
}

std::unique_ptr<Communicator> Communicator::connect(const WorldInfo& world,
                                                    const std::string& backend,
                                                    std::chrono::milliseconds timeout) {
  // A write to a dead peer's socket raises SIGPIPE, whose default action ends
  // the process without a word; Python (where c10d usually runs) ignores it
  // from startup. Ignored here too, the write fails and the collective
  // reports the dead peer.
  struct sigaction old {};
  if (sigaction(SIGPIPE, nullptr, &old) == 0 && old.sa_handler == SIG_DFL) signal(SIGPIPE, SIG_IGN);
  std::unique_ptr<Communicator> c(new Communicator());
  Impl& m = *c->impl_;
  m.rank = world.rank;
  m.world_size = world.world_size;
  m.backend_name = backend;
  m.timeout = timeout;
  const std::string where = world.master_addr + ":" + std::to_string(world.master_port);
  try {
    c10d::TCPStoreOptions o;
    o.port = static_cast<uint16_t>(world.master_port);
    o.isServer = world.rank == 0;
    o.numWorkers = world.world_size;
    o.waitWorkers = true;
    o.timeout = timeout;
    m.store = c10::make_intrusive<c10d::TCPStore>(world.master_addr, o);
  } catch (const std::exception& e) {
    throw CollectiveError(m.label("rendezvous") + " at " + where + " failed: " + describe(e));
  }
  try {
    if (backend == "gloo") {
#ifdef QLORA_HAVE_GLOO
      auto opts = c10d::ProcessGroupGloo::Options::create_default(timeout);
      m.backend =
          c10::make_intrusive<c10d::ProcessGroupGloo>(m.store, world.rank, world.world_size, opts);
#else
      throw std::invalid_argument(
          "this build has no Gloo process group (gloo's headers were missing at build time: "
          "apt-get install libgloo-dev and rebuild)");
#endif
    } else if (backend == "nccl") {
      m.backend = detail::make_nccl_backend(m.store, world.rank, world.world_size, timeout);
    } else {
      throw std::invalid_argument("unknown backend \"" + backend + "\" (gloo or nccl)");
    }
  } catch (const std::invalid_argument&) {
    throw;
  } catch (const std::exception& e) {
    throw CollectiveError(m.label("creating the ") + backend + " process group via " + where +
                          " failed: " + describe(e));
  }
  return c;
}

int Communicator::rank() const { return impl_->rank; }
int Communicator::world_size() const { return impl_->world_size; }
const std::string& Communicator::backend() const { return impl_->backend_name; }

PendingCollective Communicator::all_reduce_sum_async(at::Tensor& t) {
  PendingCollective p;
  p.impl_ = std::make_unique<PendingCollective::Impl>();
  p.impl_->what = impl_->label("all_reduce");
  try {
    std::vector<at::Tensor> ts{t};
    p.impl_->work = impl_->backend->allreduce(ts, c10d::AllreduceOptions{});
  } catch (const std::exception& e) {
    throw CollectiveError(p.impl_->what + " failed: " + describe(e));
  }
  return p;
}

void Communicator::all_reduce_sum(at::Tensor& t) { all_reduce_sum_async(t).wait(); }

void Communicator::all_reduce_max(at::Tensor& t) {
  impl_->run("all_reduce(max)", [&] {
    std::vector<at::Tensor> ts{t};
    c10d::AllreduceOptions o;
    o.reduceOp = c10d::ReduceOp::MAX;
    return impl_->backend->allreduce(ts, o);
  });
}

void Communicator::broadcast(at::Tensor& t, int root) {
  impl_->run("broadcast", [&] {
    std::vector<at::Tensor> ts{t};
    c10d::BroadcastOptions o;
    o.rootRank = root;
    return impl_->backend->broadcast(ts, o);
  });
}

std::vector<at::Tensor> Communicator::all_gather(const at::Tensor& t) {
  std::vector<std::vector<at::Tensor>> out(1);
  for (int r = 0; r < impl_->world_size; ++r) out[0].push_back(at::empty_like(t));
  std::vector<at::Tensor> in{t};
  impl_->run("all_gather", [&] { return impl_->backend->allgather(out, in); });
  return out[0];
}

void Communicator::barrier() {
  impl_->run("barrier", [&] { return impl_->backend->barrier(); });
}

std::string resolve_backend(const std::string& configured, const std::string& device_type) {
  const bool cuda = device_type == "cuda";
  if (configured == "auto") return resolve_backend(cuda ? "nccl" : "gloo", device_type);
  if (configured == "gloo") {
    if (!has_gloo())
      throw std::invalid_argument(
          "training.distributed.backend: gloo, but this build has no Gloo process group "
          "(apt-get install libgloo-dev and rebuild)");
    return "gloo";
  }
  if (configured == "nccl") {
    if (!has_nccl())
      throw std::invalid_argument(
          "training.distributed.backend: nccl, but this build has no NCCL process group (build "
          "with QLORA_CUDA=ON where nccl.h is found)");
    if (!cuda)
      throw std::invalid_argument(
          "training.distributed.backend: nccl needs training on CUDA; use gloo on the CPU");
    return "nccl";
  }
  throw std::invalid_argument("training.distributed.backend must be auto, gloo or nccl, got \"" +
                              configured + "\"");
}

bool has_nccl() { return detail::nccl_available(); }

bool has_gloo() {
#ifdef QLORA_HAVE_GLOO
  return true;
#else
  return false;
#endif
}

}  // namespace qlora::dist
