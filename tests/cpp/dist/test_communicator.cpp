// c10d from C++ (TCPStore + ProcessGroupGloo built on Debian's gloo headers):
// construction, every collective we use, teardown repeated without leaking
// sockets or threads, a dead peer turning into a CollectiveError within the
// timeout, and the gradient reducer's sums and overlap. Two ranks run as
// threads of this process over 127.0.0.1.
#include <dirent.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <chrono>
#include <cstdlib>
#include <functional>
#include <thread>

#include "qlora/dist/communicator.h"
#include "qlora/dist/gradient_reducer.h"
#include "qlora/dist/launcher.h"

namespace qlora::dist {
namespace {

using namespace std::chrono_literals;

// Builds without gloo's headers have no CPU process group to test.
#define REQUIRE_GLOO() \
  if (!has_gloo()) GTEST_SKIP() << "built without gloo's headers (libgloo-dev)"

// Runs body(rank) on `world` threads, each with its own Communicator.
void run_ranks(int world, const std::function<void(Communicator&)>& body,
               std::chrono::milliseconds timeout = 20s) {
  const int port = free_port("127.0.0.1");
  std::vector<std::thread> threads;
  std::vector<std::string> errors(world);
  for (int r = 0; r < world; ++r) {
    threads.emplace_back([&, r] {
      try {
        WorldInfo w;
        w.rank = r;
        w.world_size = world;
        w.master_port = port;
        auto comm = Communicator::connect(w, "gloo", timeout);
        body(*comm);
      } catch (const std::exception& e) {
        errors[r] = e.what();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (int r = 0; r < world; ++r) EXPECT_EQ(errors[r], "") << "rank " << r;
}

int count_entries(const char* dir) {
  int n = 0;
  if (DIR* d = opendir(dir)) {
    while (readdir(d)) ++n;
    closedir(d);
  }
  return n;
}

TEST(Communicator, CollectivesGiveEveryRankTheSameResult) {
  REQUIRE_GLOO();
  run_ranks(2, [](Communicator& c) {
    const int r = c.rank();
    EXPECT_EQ(c.world_size(), 2);
    EXPECT_EQ(c.backend(), "gloo");
    at::Tensor f = torch::arange(5, torch::kFloat) * (r + 1) + 0.25;
    c.all_reduce_sum(f);
    EXPECT_TRUE(torch::equal(f, torch::arange(5, torch::kFloat) * 3 + 0.5));
    at::Tensor l = torch::tensor({int64_t{r}, int64_t{10 + r}});
    c.all_reduce_sum(l);
    EXPECT_TRUE(torch::equal(l, torch::tensor({int64_t{1}, int64_t{21}})));
    at::Tensor m = torch::tensor({r == 0 ? 7.0 : -1.0, r == 1 ? 9.0 : 2.0}, torch::kDouble);
    c.all_reduce_max(m);
    EXPECT_TRUE(torch::equal(m, torch::tensor({7.0, 9.0}, torch::kDouble)));
    at::Tensor b = r == 0 ? torch::tensor({1.5f, 2.5f}) : torch::zeros({2});
    c.broadcast(b, 0);
    EXPECT_TRUE(torch::equal(b, torch::tensor({1.5f, 2.5f})));
    auto g = c.all_gather(torch::full({3}, static_cast<float>(r)));
    ASSERT_EQ(g.size(), 2u);
    EXPECT_TRUE(torch::equal(g[1], torch::ones({3})));
    c.barrier();
  });
}

// Construction and teardown, again and again: the store's and the process
// group's sockets and threads go away with them.
TEST(Communicator, RepeatedStartAndStopLeaksNoSocketsOrThreads) {
  REQUIRE_GLOO();
  run_ranks(2, [](Communicator& c) { c.barrier(); });  // warm-up: libraries' own one-time state
  const int fds = count_entries("/proc/self/fd"), tasks = count_entries("/proc/self/task");
  for (int i = 0; i < 8; ++i) {
    run_ranks(2, [](Communicator& c) {
      at::Tensor t = torch::ones({1000});
      c.all_reduce_sum(t);
      EXPECT_EQ(t[999].item<float>(), 2.0f);
    });
  }
  // Gloo's and the store's threads are joined in their destructors. A joined
  // thread may stay listed in /proc/self/task a moment longer (the kernel wakes
  // the joiner before it reaps the thread): give it up to 5 s on a busy machine.
  for (int waited_ms = 0; waited_ms < 5000; waited_ms += 10) {
    if (count_entries("/proc/self/fd") <= fds && count_entries("/proc/self/task") <= tasks) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_LE(count_entries("/proc/self/fd"), fds);
  EXPECT_LE(count_entries("/proc/self/task"), tasks);
}

TEST(Communicator, ADeadPeerIsACollectiveErrorWithinTheTimeout) {
  REQUIRE_GLOO();
  const int port = free_port("127.0.0.1");
  std::string error;
  std::chrono::steady_clock::duration waited{};
  std::thread rank1([&] {
    WorldInfo w;
    w.rank = 1;
    w.world_size = 2;
    w.master_port = port;
    auto comm = Communicator::connect(w, "gloo", 3s);
    comm->barrier();
    // Leaves without joining the next collective, as a killed worker would.
  });
  WorldInfo w;
  w.world_size = 2;
  w.master_port = port;
  auto comm = Communicator::connect(w, "gloo", 3s);
  comm->barrier();
  rank1.join();
  const auto start = std::chrono::steady_clock::now();
  try {
    at::Tensor t = torch::ones({4});
    comm->all_reduce_sum(t);
  } catch (const CollectiveError& e) {
    error = e.what();
  }
  waited = std::chrono::steady_clock::now() - start;
  EXPECT_NE(error.find("rank 0 of 2: all_reduce failed"), std::string::npos) << error;
  EXPECT_LT(waited, 10s);
}

TEST(WorldInfo, ReadsTorchrunVariablesAndNamesABadOne) {
  ::unsetenv("WORLD_SIZE");
  EXPECT_FALSE(WorldInfo::from_environment().has_value());
  ::setenv("WORLD_SIZE", "4", 1);
  ::setenv("RANK", "2", 1);
  ::setenv("LOCAL_RANK", "0", 1);
  ::setenv("MASTER_ADDR", "10.0.0.1", 1);
  ::setenv("MASTER_PORT", "29511", 1);
  auto w = WorldInfo::from_environment();
  ASSERT_TRUE(w.has_value());
  EXPECT_EQ(w->rank, 2);
  EXPECT_EQ(w->world_size, 4);
  EXPECT_EQ(w->master_addr, "10.0.0.1");
  EXPECT_EQ(w->master_port, 29511);
  ::setenv("RANK", "4", 1);
  try {
    WorldInfo::from_environment();
    ADD_FAILURE() << "RANK 4 of 4 accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("RANK=\"4\""), std::string::npos) << e.what();
  }
  for (const char* v : {"WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"})
    ::unsetenv(v);
}

TEST(ResolveBackend, AutoIsGlooOnTheCpuAndNcclIsRefusedThere) {
  EXPECT_EQ(resolve_backend("auto", "cpu"), "gloo");
  EXPECT_EQ(resolve_backend("gloo", "cpu"), "gloo");
  EXPECT_THROW(resolve_backend("nccl", "cpu"), std::invalid_argument);
  EXPECT_THROW(resolve_backend("mpi", "cpu"), std::invalid_argument);
}

// Three parameters, one per bucket, so that buckets start inside backward.
struct Toy {
  std::vector<at::Tensor> params;
  explicit Toy(int64_t seed) {
    torch::manual_seed(seed);
    for (int i = 0; i < 3; ++i) params.push_back(torch::randn({64, 64}).requires_grad_());
  }
  at::Tensor loss(const at::Tensor& x) {
    at::Tensor h = x;
    for (auto& p : params) h = torch::tanh(h.matmul(p));
    return h.pow(2).sum();
  }
};

TEST(GradientReducer, SumsGradientsOverRanksStartingBucketsDuringBackward) {
  REQUIRE_GLOO();
  // The reference: both ranks' gradients, computed here and added.
  Toy ref(1);
  const at::Tensor x0 = torch::randn({8, 64}), x1 = torch::randn({5, 64}),
                   x2 = torch::randn({3, 64});
  ref.loss(x0).backward();
  ref.loss(x1).backward();  // rank 0 accumulates two micro-batches
  ref.loss(x2).backward();  // rank 1's one
  // Built here: ranks are threads, and the default generator is one per process.
  std::vector<Toy> toys{Toy(1), Toy(1)};
  run_ranks(2, [&](Communicator& c) {
    Toy& toy = toys[c.rank()];
    GradientReducer reducer(c, toy.params, /*bucket_bytes=*/64 * 64 * 4);
    EXPECT_EQ(reducer.num_buckets(), 3);
    if (c.rank() == 0) {
      toy.loss(x0).backward();  // no sync for the first micro-batch
      reducer.prepare_for_backward();
      toy.loss(x1).backward();
      // The buckets of the last layers were ready (and started) before backward ended.
      EXPECT_GE(reducer.started_during_backward(), 2);
    } else {
      reducer.prepare_for_backward();
      toy.loss(x2).backward();
    }
    reducer.finish();
    for (size_t i = 0; i < 3; ++i)
      EXPECT_TRUE(torch::allclose(toy.params[i].grad(), ref.params[i].grad(), 1e-5, 1e-5)) << i;
  });
}

TEST(GradientReducer, ARankWithoutABatchContributesZeros) {
  REQUIRE_GLOO();
  Toy ref(2);
  const at::Tensor x = torch::randn({4, 64});
  ref.loss(x).backward();
  std::vector<Toy> toys{Toy(2), Toy(2)};
  run_ranks(2, [&](Communicator& c) {
    Toy& toy = toys[c.rank()];
    GradientReducer reducer(c, toy.params, 1 << 20);
    if (c.rank() == 0) {
      reducer.prepare_for_backward();
      toy.loss(x).backward();
    }
    reducer.finish();  // rank 1: no backward at all this window
    for (size_t i = 0; i < 3; ++i)
      EXPECT_TRUE(torch::equal(toy.params[i].grad(), ref.params[i].grad()));
  });
}

TEST(GradientReducer, CheckIdenticalNamesTheParameterThatDiffers) {
  REQUIRE_GLOO();
  std::vector<Toy> same{Toy(3), Toy(3)}, differs{Toy(3), Toy(3)};
  torch::NoGradGuard no_grad;
  differs[1].params[1].add_(1e-3);
  run_ranks(2, [&](Communicator& c) {
    EXPECT_NO_THROW(check_identical(c, same[c.rank()].params, {"a", "b", "c"}));
    try {
      check_identical(c, differs[c.rank()].params, {"a", "b", "c"});
      ADD_FAILURE() << "differing parameters accepted";
    } catch (const std::runtime_error& e) {
      if (c.rank() == 1) {
        EXPECT_NE(std::string(e.what()).find("(first: b)"), std::string::npos) << e.what();
      }
    }
  });
}

}  // namespace
}  // namespace qlora::dist
