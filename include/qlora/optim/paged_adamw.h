// PagedAdamW: AdamW with optional 8-bit blockwise states (bitsandbytes'
// design: dynamic maps, blocks of 256, small tensors stay 32-bit) and
// optional paging of the states (CUDA managed memory prefetched per update;
// on CPU a memory-mapped page file with a resident-memory budget).
#pragma once

#include <torch/optim/optimizer.h>
#include <torch/optim/serialize.h>

#include <memory>
#include <string>
#include <tuple>
#include <vector>

namespace qlora::optim {

class StateStorage;

struct PagedAdamWOptions : public torch::optim::OptimizerCloneableOptions<PagedAdamWOptions> {
  PagedAdamWOptions(double lr = 1e-3) : lr_(lr) {}
  TORCH_ARG(double, lr) = 1e-3;
  typedef std::tuple<double, double> betas_t;
  TORCH_ARG(betas_t, betas) = std::make_tuple(0.9, 0.999);
  TORCH_ARG(double, eps) = 1e-8;
  TORCH_ARG(double, weight_decay) = 1e-2;
  TORCH_ARG(int64_t, optim_bits) = 32;  // 32 or 8
  TORCH_ARG(bool, paged) = false;
  TORCH_ARG(int64_t, min_8bit_size) = 4096;  // smaller tensors keep 32-bit states
  TORCH_ARG(int64_t, block_size) = 256;
  // CPU paging: directory of the (unlinked) page file, and how many bytes of
  // optimizer state may stay resident (0: evict each state after its update).
  TORCH_ARG(std::string, page_dir) = "";
  TORCH_ARG(int64_t, resident_budget_bytes) = 0;
  // One fused kernel per parameter (optimizer_update_32bit /
  // optimizer_update_8bit_blockwise) or the chain of unfused ops: the same
  // arithmetic, bit for bit; the chain allocates float32 copies of 8-bit states.
  TORCH_ARG(bool, fused) = true;

 public:
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
  double get_lr() const override { return lr(); }
  void set_lr(const double lr) override { this->lr(lr); }
};

struct PagedAdamWParamState
    : public torch::optim::OptimizerCloneableParamState<PagedAdamWParamState> {
  TORCH_ARG(int64_t, step) = 0;
  TORCH_ARG(at::Tensor, exp_avg);            // float32, or uint8 codes in 8-bit mode
  TORCH_ARG(at::Tensor, exp_avg_sq);         // float32, or uint8 codes in 8-bit mode
  TORCH_ARG(at::Tensor, absmax1);            // 8-bit mode: per-block absmax of exp_avg
  TORCH_ARG(at::Tensor, absmax2);            // 8-bit mode: per-block absmax of exp_avg_sq
  TORCH_ARG(int64_t, skipped_elements) = 0;  // non-finite gradient elements not applied

 public:
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
  bool is_8bit() const { return exp_avg().defined() && exp_avg().scalar_type() == at::kByte; }
};

class PagedAdamW : public torch::optim::Optimizer {
 public:
  explicit PagedAdamW(const std::vector<torch::optim::OptimizerParamGroup>& param_groups,
                      PagedAdamWOptions defaults = {});
  explicit PagedAdamW(std::vector<at::Tensor> params, PagedAdamWOptions defaults = {})
      : PagedAdamW({torch::optim::OptimizerParamGroup(std::move(params))}, std::move(defaults)) {}
  ~PagedAdamW() override;

  at::Tensor step(LossClosure closure = nullptr) override;
  void save(torch::serialize::OutputArchive& archive) const override;
  void load(torch::serialize::InputArchive& archive) override;

  // Bytes of optimizer state, and how many of them are resident in RAM/VRAM
  // right now (paged CPU states report what the page file keeps mapped).
  int64_t state_bytes() const;

  // One parameter's state as plain tensors, for moving it between processes
  // (ZeRO-1 checkpoints): {step, skipped_elements} as int64 [2], then
  // exp_avg, exp_avg_sq, and in 8-bit mode absmax1, absmax2; empty when the
  // parameter has no state yet.
  std::vector<at::Tensor> export_param_state(const at::Tensor& p) const;
  // Installs such a state for `p` (in plain memory until its first update).
  void import_param_state(const at::Tensor& p, const std::vector<at::Tensor>& state);
  // Forgets `p`'s state (a parameter another rank updates).
  void drop_param_state(const at::Tensor& p);

 private:
  void update(at::Tensor& p, const PagedAdamWOptions& options);
  PagedAdamWParamState& state_for(const at::Tensor& p, const PagedAdamWOptions& options);

  std::unique_ptr<StateStorage> storage_;
  at::Tensor signed_map_, unsigned_map_;  // per device of the last update

  template <typename Self, typename Archive>
  static void serialize(Self& self, Archive& archive) {
    _TORCH_OPTIM_SERIALIZE_WITH_TEMPLATE_ARG(PagedAdamW);
  }
};

}  // namespace qlora::optim
