#include "qlora/dist/gradient_reducer.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/utils/lambda_post_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <algorithm>
#include <mutex>
#include <stdexcept>

namespace qlora::dist {

struct Bucket {
  std::vector<size_t> members;  // indices into State::params
  std::vector<int64_t> offsets;
  at::Tensor flat;
  size_t pending = 0;  // members whose gradient this window has not produced yet
  bool started = false;
  PendingCollective work;
};

struct GradientReducer::State {
  Communicator* comm = nullptr;
  std::vector<at::Tensor> params;
  std::vector<size_t> bucket_of;  // per parameter
  std::vector<bool> ready;        // per parameter, this window
  std::vector<Bucket> buckets;
  // The accumulators must outlive the hooks' registration: autograd keeps
  // only a weak reference from the parameter.
  std::vector<std::shared_ptr<torch::autograd::Node>> accumulators;
  std::mutex mutex;  // hooks may run on autograd worker threads
  bool armed = false;
  bool alive = true;
  size_t next_bucket = 0;
  int64_t started_in_backward = 0;

  void mark_ready(size_t i) {
    std::lock_guard<std::mutex> lock(mutex);
    if (!alive || !armed || ready[i]) return;
    ready[i] = true;
    Bucket& b = buckets[bucket_of[i]];
    if (--b.pending == 0) start_ready_buckets(/*in_backward=*/true);
  }
  void reset() {
    std::fill(ready.begin(), ready.end(), false);
    for (Bucket& b : buckets) {
      b.pending = b.members.size();
      b.started = false;
    }
    next_bucket = 0;
    started_in_backward = 0;
  }
  // Buckets start in order: a ready bucket waits for the ones before it.
  void start_ready_buckets(bool in_backward) {
    while (next_bucket < buckets.size() && buckets[next_bucket].pending == 0) {
      start(buckets[next_bucket], in_backward);
      ++next_bucket;
    }
  }
  void start(Bucket& b, bool in_backward) {
    for (size_t k = 0; k < b.members.size(); ++k) {
      const at::Tensor& p = params[b.members[k]];
      at::Tensor slot = b.flat.narrow(0, b.offsets[k], p.numel());
      const at::Tensor& g = p.grad();
      if (g.defined())
        slot.copy_(g.reshape({-1}));
      else
        slot.zero_();
    }
    b.work = comm->all_reduce_sum_async(b.flat);
    b.started = true;
    if (in_backward) ++started_in_backward;
  }
};

GradientReducer::GradientReducer(Communicator& comm, std::vector<at::Tensor> params,
                                 int64_t bucket_bytes)
    : s_(std::make_shared<State>()) {
  State& s = *s_;
  s.comm = &comm;
  s.params = std::move(params);
  s.bucket_of.assign(s.params.size(), 0);
  s.ready.assign(s.params.size(), false);
  // Reverse order, split at the byte cap and wherever dtype or device changes.
  int64_t bytes = 0;
  for (size_t j = s.params.size(); j-- > 0;) {
    const at::Tensor& p = s.params[j];
    if (!p.requires_grad() || !p.is_leaf())
      throw std::invalid_argument("GradientReducer: parameter " + std::to_string(j) +
                                  " is not a leaf that requires grad");
    const int64_t nbytes = p.numel() * static_cast<int64_t>(p.element_size());
    bool fresh = s.buckets.empty() || bytes + nbytes > bucket_bytes;
    if (!fresh) {
      const at::Tensor& first = s.params[s.buckets.back().members.front()];
      fresh = first.scalar_type() != p.scalar_type() || first.device() != p.device();
    }
    if (fresh) {
      s.buckets.emplace_back();
      bytes = 0;
    }
    Bucket& b = s.buckets.back();
    b.offsets.push_back(b.members.empty() ? 0
                                          : b.offsets.back() + s.params[b.members.back()].numel());
    b.members.push_back(j);
    s.bucket_of[j] = s.buckets.size() - 1;
    bytes += nbytes;
  }
  for (Bucket& b : s.buckets) {
    const at::Tensor& last = s.params[b.members.back()];
    b.flat = at::empty({b.offsets.back() + last.numel()}, last.options());
  }
  std::weak_ptr<State> weak = s_;
  for (size_t i = 0; i < s.params.size(); ++i) {
    auto acc = torch::autograd::impl::grad_accumulator(s.params[i]);
    acc->add_post_hook(std::make_unique<torch::autograd::utils::LambdaPostHook>(
        [weak, i](const torch::autograd::variable_list& outputs,
                  const torch::autograd::variable_list&) {
          if (auto st = weak.lock()) st->mark_ready(i);
          return outputs;
        }));
    s.accumulators.push_back(std::move(acc));
  }
}

GradientReducer::~GradientReducer() {
  std::lock_guard<std::mutex> lock(s_->mutex);
  s_->alive = false;
}

void GradientReducer::prepare_for_backward() {
  std::lock_guard<std::mutex> lock(s_->mutex);
  s_->reset();
  s_->armed = true;
}

void GradientReducer::finish() {
  State& s = *s_;
  {
    std::lock_guard<std::mutex> lock(s.mutex);
    if (!s.armed) s.reset();                    // no backward on this rank this window
    for (Bucket& b : s.buckets) b.pending = 0;  // whatever did not arrive counts as zeros
    s.start_ready_buckets(/*in_backward=*/false);
    s.armed = false;
  }
  for (Bucket& b : s.buckets) {
    b.work.wait();
    for (size_t k = 0; k < b.members.size(); ++k) {
      at::Tensor& p = s.params[b.members[k]];
      at::Tensor sum = b.flat.narrow(0, b.offsets[k], p.numel()).view(p.sizes());
      if (p.grad().defined())
        p.mutable_grad().copy_(sum);
      else
        p.mutable_grad() = sum.clone();
    }
  }
}

int64_t GradientReducer::num_buckets() const { return static_cast<int64_t>(s_->buckets.size()); }

int64_t GradientReducer::started_during_backward() const { return s_->started_in_backward; }

void check_identical(Communicator& comm, const std::vector<at::Tensor>& params,
                     const std::vector<std::string>& names) {
  int64_t first_bad = -1;
  for (size_t i = 0; i < params.size(); ++i) {
    at::Tensor mine = params[i].detach().contiguous();
    at::Tensor root = mine.clone();
    comm.broadcast(root, 0);
    if (first_bad < 0 && !at::equal(mine, root)) first_bad = static_cast<int64_t>(i);
  }
  // Every rank learns whether any rank differs, so all fail together.
  // (on the parameters' device: NCCL moves CUDA tensors only)
  at::Tensor bad = at::full({1}, first_bad >= 0 ? 1 : 0,
                            at::TensorOptions().dtype(at::kLong).device(
                                params.empty() ? c10::Device(c10::kCPU) : params.front().device()));
  comm.all_reduce_max(bad);
  if (bad.item<int64_t>() == 0) return;
  const std::string name =
      first_bad >= 0 && static_cast<size_t>(first_bad) < names.size() ? names[first_bad] : "?";
  throw std::runtime_error(
      "rank " + std::to_string(comm.rank()) +
      ": the trainable parameters differ between ranks at start" +
      (first_bad >= 0 ? " (first: " + name + ")" : std::string(" (on another rank)")) +
      "; every rank must load the same model and checkpoint with the same training.seed");
}

}  // namespace qlora::dist
