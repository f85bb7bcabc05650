#include "qlora/optim/paged_adamw.h"

#include <ATen/ops/isfinite.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros_like.h>
#include <torch/serialize/archive.h>

#include <cmath>

#include "common/adamw_math.h"
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
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(fused);
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
  // Checkpoints written before the fused kernels existed have no "fused".
  torch::IValue fused_value;
  if (archive.try_read("fused", fused_value)) fused(fused_value.toBool());
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

namespace {

// The unfused update: a chain of separate elementwise ops, each rounding
// once to float32 (no alpha / addcmul / addcdiv forms, which ATen computes
// with or without FMA depending on the CPU), so it is the same arithmetic
// as the fused kernels (common/adamw_math.h) and their reference in tests.
// The square root is taken in float64 and rounded: ATen's float32 sqrt
// (MKL's vector math) is not always correctly rounded, a float64 root
// within an ulp is, once rounded to float32.
void unfused_adamw(at::Tensor& p, at::Tensor grad, at::Tensor& exp_avg, at::Tensor& exp_avg_sq,
                   const detail::AdamWScalars& s) {
  const at::Tensor finite = at::isfinite(grad);
  const bool all_finite = finite.all().item<bool>();
  at::Tensor p_before, m_before, v_before;
  if (!all_finite) {
    grad = at::where(finite, grad, at::zeros_like(grad));
    p_before = p.detach().clone();
    m_before = exp_avg.clone();
    v_before = exp_avg_sq.clone();
  }
  const at::Tensor g = grad.to(at::kFloat);
  at::Tensor pf = p.detach().to(at::kFloat);
  if (s.apply_decay) pf.mul_(static_cast<double>(s.decay));
  exp_avg.mul_(static_cast<double>(s.beta1)).add_(g.mul(static_cast<double>(s.one_minus_beta1)));
  exp_avg_sq.mul_(static_cast<double>(s.beta2))
      .add_(g.mul(g).mul_(static_cast<double>(s.one_minus_beta2)));
  const at::Tensor denom = exp_avg_sq.to(at::kDouble)
                               .sqrt_()
                               .to(at::kFloat)
                               .div_(at::scalar_tensor(s.sqrt_correction2, g.options()))
                               .add_(at::scalar_tensor(s.eps, g.options()));
  pf.add_(exp_avg.div(denom).mul_(static_cast<double>(s.neg_step_size)));
  p.detach().copy_(pf);
  if (!all_finite) {
    p.detach().copy_(at::where(finite, p.detach(), p_before));
    exp_avg.copy_(at::where(finite, exp_avg, m_before));
    exp_avg_sq.copy_(at::where(finite, exp_avg_sq, v_before));
  }
}

}  // namespace

// One parameter: Adam with decoupled weight decay on float32 moments (8-bit
// blockwise in 8-bit mode), by one fused op per parameter, or the unfused op
// chain. Gradient elements that are inf/NaN leave that element's parameter
// and moments as they were.
void PagedAdamW::update(at::Tensor& p, const PagedAdamWOptions& o) {
  at::Tensor grad = p.grad();
  TORCH_CHECK(!grad.is_sparse(), "PagedAdamW does not support sparse gradients");
  PagedAdamWParamState& st = state_for(p, o);
  const bool eight_bit = st.is_8bit();
  for (const at::Tensor* t : {&st.exp_avg(), &st.exp_avg_sq(), &st.absmax1(), &st.absmax2()})
    if (t->defined()) storage_->before_use(*t);

  if (!at::isfinite(grad).all().item<bool>())
    st.skipped_elements(st.skipped_elements() + grad.numel() -
                        at::isfinite(grad).sum().item<int64_t>());
  if (eight_bit && (!signed_map_.defined() || signed_map_.device() != p.device())) {
    signed_map_ = dynamic_map(true).to(p.device());
    unsigned_map_ = dynamic_map(false).to(p.device());
  }
  at::NoGradGuard no_grad;
  st.step(st.step() + 1);
  const auto [beta1, beta2] = o.betas();
  if (o.fused()) {
    AdamStepArgs args;
    args.lr = o.lr();
    args.beta1 = beta1;
    args.beta2 = beta2;
    args.eps = o.eps();
    args.weight_decay = o.weight_decay();
    args.step = st.step();
    at::Tensor g = grad.contiguous();
    at::Tensor param = p.detach();
    TORCH_CHECK(param.is_contiguous(), "PagedAdamW: parameters must be contiguous");
    if (eight_bit)
      optimizer_update_8bit_blockwise(g, param, st.exp_avg(), st.exp_avg_sq(), signed_map_,
                                      unsigned_map_, st.absmax1(), st.absmax2(), args);
    else
      optimizer_update_32bit(g, param, st.exp_avg(), st.exp_avg_sq(), args);
  } else {
    const auto s = detail::make_adamw_scalars(beta1, beta2, o.eps(), o.weight_decay(), st.step(),
                                              o.lr(), 1.0, false);
    at::Tensor m = eight_bit ? dequantize_blockwise(st.exp_avg(), st.absmax1(), signed_map_,
                                                    o.block_size(), at::kFloat)
                             : st.exp_avg();
    at::Tensor v = eight_bit ? dequantize_blockwise(st.exp_avg_sq(), st.absmax2(), unsigned_map_,
                                                    o.block_size(), at::kFloat)
                             : st.exp_avg_sq();
    unfused_adamw(p, grad, m, v, s);
    if (eight_bit) {
      auto [q1, a1] = quantize_blockwise(m, signed_map_, o.block_size());
      auto [q2, a2] = quantize_blockwise(v, unsigned_map_, o.block_size());
      st.exp_avg().copy_(q1);
      st.absmax1().copy_(a1);
      st.exp_avg_sq().copy_(q2);
      st.absmax2().copy_(a2);
    }
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
