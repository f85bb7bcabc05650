#include "qlora/optim/paged_adamw.h"

#include <ATen/ops/isfinite.h>
#include <ATen/ops/where.h>
#include <torch/serialize/archive.h>

#include <cmath>

#include "optim/state_storage.h"
#include "qlora/ops.h"
#include "qlora/quant_state.h"

namespace qlora::optim {

void PagedAdamWOptions::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(lr);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(betas);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(eps);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(weight_decay);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(optim_bits);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(paged);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(min_8bit_size);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(block_size);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(page_dir);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(resident_budget_bytes);
}

void PagedAdamWOptions::serialize(torch::serialize::InputArchive& archive) {
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, lr);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(betas_t, betas);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, eps);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, weight_decay);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(int64_t, optim_bits);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, paged);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(int64_t, min_8bit_size);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(int64_t, block_size);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(std::string, page_dir);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(int64_t, resident_budget_bytes);
}

void PagedAdamWParamState::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(step);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(exp_avg);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(exp_avg_sq);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(absmax1);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(absmax2);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(skipped_elements);
}

void PagedAdamWParamState::serialize(torch::serialize::InputArchive& archive) {
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(int64_t, step);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, exp_avg);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, exp_avg_sq);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, absmax1);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, absmax2);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(int64_t, skipped_elements);
}

namespace {

void check_options(const PagedAdamWOptions& o) {
  TORCH_CHECK(o.lr() >= 0, "PagedAdamW: invalid learning rate ", o.lr());
  TORCH_CHECK(o.eps() >= 0, "PagedAdamW: invalid eps ", o.eps());
  const auto [b1, b2] = o.betas();
  TORCH_CHECK(b1 >= 0 && b1 < 1 && b2 >= 0 && b2 < 1, "PagedAdamW: betas must be in [0, 1), got (",
              b1, ", ", b2, ")");
  TORCH_CHECK(o.weight_decay() >= 0, "PagedAdamW: invalid weight_decay ", o.weight_decay());
  TORCH_CHECK(o.optim_bits() == 32 || o.optim_bits() == 8,
              "PagedAdamW: optim_bits must be 32 or 8, got ", o.optim_bits());
  TORCH_CHECK(o.block_size() == 256,
              "PagedAdamW: block_size must be 256 (bitsandbytes' 8-bit "
              "optimizer layout), got ",
              o.block_size());
}

// Moves a loaded (plain) state tensor into the optimizer's storage.
at::Tensor adopt(StateStorage& storage, const at::Tensor& t, c10::Device device) {
  if (!t.defined() || (storage.owns(t) && t.device() == device)) return t;
  at::Tensor dst = storage.zeros(t.sizes(), t.scalar_type(), device);
  dst.copy_(t);
  return dst;
}

}  // namespace

PagedAdamW::PagedAdamW(const std::vector<torch::optim::OptimizerParamGroup>& param_groups,
                       PagedAdamWOptions defaults)
    : Optimizer(param_groups, std::make_unique<PagedAdamWOptions>(defaults)) {
  check_options(defaults);
  storage_ = defaults.paged()
                 ? make_paged_storage(defaults.page_dir(), defaults.resident_budget_bytes())
                 : make_plain_storage();
}

PagedAdamW::~PagedAdamW() = default;

PagedAdamWParamState& PagedAdamW::state_for(const at::Tensor& p, const PagedAdamWOptions& o) {
  auto it = state_.find(p.unsafeGetTensorImpl());
  if (it == state_.end()) {
    auto st = std::make_unique<PagedAdamWParamState>();
    const bool eight_bit = o.optim_bits() == 8 && p.numel() >= o.min_8bit_size();
    const auto dtype = eight_bit ? at::kByte : p.scalar_type();
    st->exp_avg(storage_->zeros(p.sizes(), dtype, p.device()));
    st->exp_avg_sq(storage_->zeros(p.sizes(), dtype, p.device()));
    if (eight_bit) {
      const int64_t blocks = (p.numel() + o.block_size() - 1) / o.block_size();
      st->absmax1(storage_->zeros({blocks}, at::kFloat, p.device()));
      st->absmax2(storage_->zeros({blocks}, at::kFloat, p.device()));
    }
    it = state_.emplace(p.unsafeGetTensorImpl(), std::move(st)).first;
  }
  auto& st = static_cast<PagedAdamWParamState&>(*it->second);
  // States restored by load() live in plain memory until their first use.
  st.exp_avg(adopt(*storage_, st.exp_avg(), p.device()));
  st.exp_avg_sq(adopt(*storage_, st.exp_avg_sq(), p.device()));
  st.absmax1(adopt(*storage_, st.absmax1(), p.device()));
  st.absmax2(adopt(*storage_, st.absmax2(), p.device()));
  return st;
}

// One parameter: exactly torch::optim::AdamW's arithmetic on float32 moments
// (dequantised from, and re-quantised to, 8 bits in 8-bit mode). Gradient
// elements that are inf/NaN leave that element's parameter and moments as
// they were.
void PagedAdamW::update(at::Tensor& p, const PagedAdamWOptions& o) {
  at::Tensor grad = p.grad();
  TORCH_CHECK(!grad.is_sparse(), "PagedAdamW does not support sparse gradients");
  PagedAdamWParamState& st = state_for(p, o);
  const bool eight_bit = st.is_8bit();
  for (const at::Tensor* t : {&st.exp_avg(), &st.exp_avg_sq(), &st.absmax1(), &st.absmax2()})
    if (t->defined()) storage_->before_use(*t);

  at::Tensor finite;
  if (!at::isfinite(grad).all().item<bool>()) {
    finite = at::isfinite(grad);
    st.skipped_elements(st.skipped_elements() + grad.numel() - finite.sum().item<int64_t>());
    grad = at::where(finite, grad, at::zeros_like(grad));
  }
  if (eight_bit && (!signed_map_.defined() || signed_map_.device() != p.device())) {
    signed_map_ = dynamic_map(true).to(p.device());
    unsigned_map_ = dynamic_map(false).to(p.device());
  }
  at::Tensor exp_avg = eight_bit ? dequantize_blockwise(st.exp_avg(), st.absmax1(), signed_map_,
                                                        o.block_size(), at::kFloat)
                                 : st.exp_avg();
  at::Tensor exp_avg_sq = eight_bit
                              ? dequantize_blockwise(st.exp_avg_sq(), st.absmax2(), unsigned_map_,
                                                     o.block_size(), at::kFloat)
                              : st.exp_avg_sq();
  at::Tensor p_before, m_before, v_before;
  if (finite.defined()) {
    p_before = p.detach().clone();
    m_before = exp_avg.clone();
    v_before = exp_avg_sq.clone();
  }

  at::NoGradGuard no_grad;
  if (o.weight_decay() != 0) p.mul_(1 - o.lr() * o.weight_decay());
  st.step(st.step() + 1);
  const auto [beta1, beta2] = o.betas();
  const double bias_correction1 = 1 - std::pow(beta1, st.step());
  const double bias_correction2 = 1 - std::pow(beta2, st.step());
  exp_avg.mul_(beta1).add_(grad, 1 - beta1);
  exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2);
  const at::Tensor denom = (exp_avg_sq.sqrt() / std::sqrt(bias_correction2)).add_(o.eps());
  p.addcdiv_(exp_avg, denom, -o.lr() / bias_correction1);

  if (finite.defined()) {
    p.copy_(at::where(finite, p, p_before));
    exp_avg.copy_(at::where(finite, exp_avg, m_before));
    exp_avg_sq.copy_(at::where(finite, exp_avg_sq, v_before));
  }
  if (eight_bit) {
    auto [q1, a1] = quantize_blockwise(exp_avg, signed_map_, o.block_size());
    auto [q2, a2] = quantize_blockwise(exp_avg_sq, unsigned_map_, o.block_size());
    st.exp_avg().copy_(q1);
    st.absmax1().copy_(a1);
    st.exp_avg_sq().copy_(q2);
    st.absmax2().copy_(a2);
  }
  for (const at::Tensor* t : {&st.exp_avg(), &st.exp_avg_sq(), &st.absmax1(), &st.absmax2()})
    if (t->defined()) storage_->after_use(*t);
}

at::Tensor PagedAdamW::step(LossClosure closure) {
  at::Tensor loss;
  if (closure) {
    at::AutoGradMode enable_grad(true);
    loss = closure();
  }
  for (auto& group : param_groups_) {
    const auto& o = static_cast<const PagedAdamWOptions&>(group.options());
    for (auto& p : group.params())
      if (p.grad().defined()) update(p, o);
  }
  return loss;
}

void PagedAdamW::save(torch::serialize::OutputArchive& archive) const { serialize(*this, archive); }

void PagedAdamW::load(torch::serialize::InputArchive& archive) {
  torch::IValue pytorch_version;
  if (archive.try_read("pytorch_version", pytorch_version)) {
    serialize(*this, archive);
    return;
  }
  TORCH_CHECK(false, "PagedAdamW::load: not a PagedAdamW archive (no pytorch_version entry)");
}

std::vector<at::Tensor> PagedAdamW::export_param_state(const at::Tensor& p) const {
  auto it = state_.find(p.unsafeGetTensorImpl());
  if (it == state_.end()) return {};
  const auto& st = static_cast<const PagedAdamWParamState&>(*it->second);
  std::vector<at::Tensor> out{at::tensor({st.step(), st.skipped_elements()}, at::kLong)};
  // Clones: a paged state may be a view of the page file.
  for (const at::Tensor* t : {&st.exp_avg(), &st.exp_avg_sq(), &st.absmax1(), &st.absmax2()})
    if (t->defined()) out.push_back(t->detach().to(at::kCPU).clone());
  return out;
}

void PagedAdamW::import_param_state(const at::Tensor& p, const std::vector<at::Tensor>& state) {
  TORCH_CHECK(state.size() == 3 || state.size() == 5,
              "PagedAdamW::import_param_state: expected 3 or 5 tensors, got ", state.size());
  auto st = std::make_unique<PagedAdamWParamState>();
  st->step(state[0][0].item<int64_t>());
  st->skipped_elements(state[0][1].item<int64_t>());
  st->exp_avg(state[1]);
  st->exp_avg_sq(state[2]);
  if (state.size() == 5) {
    st->absmax1(state[3]);
    st->absmax2(state[4]);
  }
  state_[p.unsafeGetTensorImpl()] = std::move(st);
}

void PagedAdamW::drop_param_state(const at::Tensor& p) { state_.erase(p.unsafeGetTensorImpl()); }

int64_t PagedAdamW::state_bytes() const {
  int64_t n = 0;
  for (const auto& [key, state] : state_) {
    const auto& st = static_cast<const PagedAdamWParamState&>(*state);
    for (const at::Tensor* t : {&st.exp_avg(), &st.exp_avg_sq(), &st.absmax1(), &st.absmax2()})
      if (t->defined()) n += t->numel() * t->element_size();
  }
  return n;
}

}  // namespace qlora::optim
