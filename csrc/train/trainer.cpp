#include "qlora/train/trainer.h"

#include <sys/resource.h>

#include <torch/nn/utils/clip_grad.h>
#include <torch/optim/adamw.h>
#include <chrono>
#include <cmath>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>

#include "qlora/data/data_loader.h"
#include "qlora/io/atomic_file.h"
#include "qlora/nn/peft_adapter.h"
#include "qlora/optim/paged_adamw.h"
#include "qlora/train/lr_schedule.h"
#include "qlora/train/stop_signals.h"
#include "train/checkpoint.h"
#include "train/label_tokens.h"
#include "train/metrics.h"
#include "util/fs.h"
#include "util/log.h"

namespace qlora::train {

namespace {

using Clock = std::chrono::steady_clock;

int64_t peak_rss_bytes() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<int64_t>(u.ru_maxrss) * 1024;
}

}  // namespace

struct Trainer::State {
  TrainConfig config;
  std::optional<ModelContext> context;
  DataSplits data;
  std::unique_ptr<data::DataLoader> loader;
  std::vector<at::Tensor> params;
  std::unique_ptr<torch::optim::Optimizer> optimizer;
  std::unique_ptr<LRSchedule> schedule;
  MetricsWriter metrics;
  detail::LoopState loop;
  GradientHook gradient_hook;
  int64_t saved_step = -1;  // the step of the last checkpoint written or resumed from
  bool training_prepared = false;

  ModelContext& ctx() {
    if (!context) context = ModelContext::load(config);
    return *context;
  }
  void setup_training();  // data, optimizer, schedule, output folder
  void build_optimizer();
  int64_t count_total_steps();
  std::vector<data::Batch> next_window();
  bool train_step();
  detail::CheckpointParts checkpoint_parts(const std::string& config_yaml);
  std::string save_checkpoint();
  [[noreturn]] void stop_for_signal(int sig);
  void resume_from(const std::string& dir);
  double evaluate() { return ctx().evaluate(data.eval, config.training.micro_batch_size); }
  std::vector<std::pair<std::string, std::string>> generate_samples() {
    return ctx().generate(config.generation.prompts, config.generation.max_new_tokens);
  }
};

Trainer::Trainer(TrainConfig config) : s_(std::make_unique<State>()) {
  s_->config = std::move(config);
}

Trainer::~Trainer() = default;

void Trainer::State::setup_training() {
  if (training_prepared) return;
  ModelContext& c = ctx();
  data = load_data_splits(config, *c.tokenizer);
  log::info("data: " + std::to_string(data.train->size()) + " training examples (" +
            std::to_string(data.train->num_label_tokens()) + " label tokens), " +
            std::to_string(data.eval->size()) + " eval examples");
  data::LoaderOptions lo;
  lo.micro_batch_size = config.training.micro_batch_size;
  lo.seed = static_cast<uint64_t>(config.training.seed);
  lo.packing = config.data.packing;
  lo.shuffle = config.data.shuffle;
  lo.max_length = config.data.max_length;
  lo.pad_id = data::padding_id(*c.tokenizer);
  loader = std::make_unique<data::DataLoader>(data.train, lo);
  build_optimizer();
  loop.total_steps = count_total_steps();
  // Only now that everything loaded: a failed start leaves no output behind.
  fs::make_dirs(config.output_dir);
  log::add_file(config.output_dir + "/train.log");
  const auto& t = config.training;
  schedule = std::make_unique<LRSchedule>(t.scheduler, t.lr, t.warmup_steps, loop.total_steps);
  metrics.open(config.output_dir);
  training_prepared = true;
}

void Trainer::State::build_optimizer() {
  const auto& t = config.training;
  // Tied weights appear twice in named_parameters(); an optimizer must see each once.
  std::set<c10::TensorImpl*> seen;
  for (const auto& p : ctx().model->parameters())
    if (p.requires_grad() && seen.insert(p.unsafeGetTensorImpl()).second) params.push_back(p);
  if (t.optimizer == "adamw") {
    optimizer = std::make_unique<torch::optim::AdamW>(
        params, torch::optim::AdamWOptions(t.lr).weight_decay(t.weight_decay));
  } else {
    optimizer = std::make_unique<optim::PagedAdamW>(
        params, optim::PagedAdamWOptions(t.lr)
                    .weight_decay(t.weight_decay)
                    .optim_bits(t.optimizer == "paged_adamw_8bit" ? 8 : 32)
                    .paged(true));
  }
}

int64_t Trainer::State::count_total_steps() {
  const auto& t = config.training;
  if (t.max_steps > 0) return t.max_steps;
  data::DataLoader probe = *loader;
  int64_t micro = 0;
  while (probe.next()) ++micro;
  return t.epochs * ((micro + t.gradient_accumulation_steps - 1) / t.gradient_accumulation_steps);
}

// The micro-batches of one optimizer step; the epoch boundary starts a new
// window, and training ends when the configured epochs are done.
std::vector<data::Batch> Trainer::State::next_window() {
  std::vector<data::Batch> window;
  while (static_cast<int64_t>(window.size()) < config.training.gradient_accumulation_steps) {
    if (config.training.max_steps <= 0 && loader->epoch() >= config.training.epochs) break;
    auto batch = loader->next();
    if (!batch) {
      if (!window.empty() ||
          (config.training.max_steps <= 0 && loader->epoch() >= config.training.epochs))
        break;
      continue;  // next epoch
    }
    window.push_back(std::move(*batch));
  }
  return window;
}

bool Trainer::State::train_step() {
  const auto window = next_window();
  if (window.empty()) return false;
  ctx().model->train();
  int64_t label_tokens = 0, tokens = 0;
  for (const auto& b : window) {
    label_tokens += detail::count_label_tokens(b.labels);
    tokens += b.attention_mask.sum().item<int64_t>();
  }
  const auto t0 = Clock::now();
  optimizer->zero_grad();
  double loss_sum = 0;
  for (const auto& b : window) {
    std::optional<at::Tensor> positions, segments;
    if (config.data.packing) {
      positions = b.position_ids;
      segments = b.segment_ids;
    }
    const at::Tensor loss =
        ctx().model->summed_loss(b.input_ids, b.labels, b.attention_mask, positions, segments) /
        std::max<int64_t>(1, label_tokens);
    loss.backward();
    loss_sum += loss.item<double>();
  }
  if (gradient_hook) gradient_hook(loop.step + 1, params);
  const double lr = schedule->lr(loop.step);
  for (auto& group : optimizer->param_groups()) group.options().set_lr(lr);
  double grad_norm = 0;
  const bool finite = std::isfinite(loss_sum);
  if (finite) {
    // The norm is taken without clipping too: a NaN gradient must skip the step either way.
    const double max_norm = config.training.max_grad_norm > 0
                                ? config.training.max_grad_norm
                                : std::numeric_limits<double>::infinity();
    grad_norm = torch::nn::utils::clip_grad_norm_(params, max_norm);
  }
  if (!finite || !std::isfinite(grad_norm)) {
    ++loop.skipped_steps;
    if (++loop.consecutive_nonfinite > config.training.max_consecutive_nonfinite)
      throw std::runtime_error(
          "stopping: " + std::to_string(loop.consecutive_nonfinite) +
          " consecutive steps with a non-finite loss or gradient (last at step " +
          std::to_string(loop.step + 1) + "); lower training.lr or use float32 compute");
    log::warn("step " + std::to_string(loop.step + 1) +
              ": non-finite loss/gradient, update skipped");
    optimizer->zero_grad();
  } else {
    loop.consecutive_nonfinite = 0;
    optimizer->step();
  }
  ++loop.step;
  const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  loop.train_seconds += seconds;
  loop.trained_tokens += tokens;
  metrics.train_step(loop.step, loop.total_steps, loss_sum, lr, grad_norm, tokens, seconds,
                     loop.trained_tokens / std::max(1e-9, loop.train_seconds),
                     config.training.log_every);
  return true;
}

detail::CheckpointParts Trainer::State::checkpoint_parts(const std::string& config_yaml) {
  return {ctx().model, ctx().lora, config.model.path, *optimizer, config_yaml};
}

std::string Trainer::State::save_checkpoint() {
  loop.data_state_json = loader->state().to_json();
  const std::string yaml = config.to_yaml();
  const std::string dir = detail::save_checkpoint(config.output_dir, checkpoint_parts(yaml), loop);
  saved_step = loop.step;
  metrics.checkpoint(loop.step);
  log::info("saved " + dir);
  detail::prune_checkpoints(config.output_dir, config.training.keep_last);
  return dir;
}

// At a step boundary: the state there is what a resumed run starts from.
void Trainer::State::stop_for_signal(int sig) {
  std::string dir;  // stays empty before the first step: nothing to save
  if (saved_step == loop.step)
    dir = config.output_dir + "/" + detail::checkpoint_name(loop.step);
  else if (loop.step > 0)
    dir = save_checkpoint();
  clear_stop_request();
  throw Interrupted(sig, dir);
}

void Trainer::State::resume_from(const std::string& dir) {
  const int64_t total_steps = loop.total_steps;  // from this run's config, not the checkpoint's
  const std::string yaml = config.to_yaml();
  loop = detail::load_checkpoint(dir, checkpoint_parts(yaml));
  loop.total_steps = total_steps;
  saved_step = loop.step;
  loader->restore(data::LoaderState::from_json(loop.data_state_json));
  metrics.truncate_after(loop.step);
  log::info("resumed from " + dir + " at step " + std::to_string(loop.step));
}

void Trainer::prepare() { s_->setup_training(); }

void Trainer::set_gradient_hook(GradientHook hook) { s_->gradient_hook = std::move(hook); }

ModelContext& Trainer::context() { return s_->ctx(); }

const TrainConfig& Trainer::config() const { return s_->config; }

double Trainer::evaluate() {
  s_->setup_training();
  return s_->evaluate();
}

TrainSummary Trainer::run() {
  auto& s = *s_;
  const auto start = Clock::now();
  s.setup_training();
  TrainSummary summary;
  std::optional<std::string> resume_dir;
  if (s.config.resume == "auto")
    resume_dir = detail::find_latest_checkpoint(s.config.output_dir);
  else if (s.config.resume != "none")
    resume_dir = s.config.resume;
  if (resume_dir) {
    s.resume_from(*resume_dir);
    summary.resumed_from_step = s.loop.step;
  }
  summary.eval_loss_before = s.evaluate();
  s.metrics.eval(s.loop.step, summary.eval_loss_before);
  summary.generations_before = s.generate_samples();
  const auto& t = s.config.training;
  while (s.loop.step < s.loop.total_steps) {
    if (const int sig = pending_stop_signal()) s.stop_for_signal(sig);
    if (!s.train_step()) break;
    const int64_t step = s.loop.step;
    if (t.save_every > 0 && step % t.save_every == 0 && step < s.loop.total_steps)
      s.save_checkpoint();
    if (const int sig = pending_stop_signal()) s.stop_for_signal(sig);
    if (t.eval_every > 0 && step % t.eval_every == 0 && step < s.loop.total_steps)
      s.metrics.eval(step, s.evaluate());
  }
  s.save_checkpoint();
  if (const int sig = pending_stop_signal()) s.stop_for_signal(sig);
  summary.eval_loss_after = s.evaluate();
  s.metrics.eval(s.loop.step, summary.eval_loss_after);
  summary.generations_after = s.generate_samples();
  const std::string adapter_dir = s.config.output_dir + "/adapter";
  nn::save_peft_adapter(adapter_dir, *s.ctx().model, s.ctx().lora, {s.config.model.path});
  summary.steps = s.loop.step;
  summary.skipped_steps = s.loop.skipped_steps;
  summary.tokens_per_second = s.loop.trained_tokens / std::max(1e-9, s.loop.train_seconds);
  summary.peak_rss_bytes = peak_rss_bytes();
  summary.wall_seconds = std::chrono::duration<double>(Clock::now() - start).count();
  summary.paths = {adapter_dir, s.config.output_dir + "/" + detail::checkpoint_name(s.loop.step),
                   s.metrics.path(), s.metrics.plot()};
  const std::string json = summary.to_json();
  io::write_bytes_atomic(s.config.output_dir + "/summary.json", json.data(), json.size());
  return summary;
}

std::string TrainSummary::to_json() const {
  nlohmann::json j;
  j["eval_loss_before"] = eval_loss_before;
  j["eval_loss_after"] = eval_loss_after;
  j["tokens_per_second"] = tokens_per_second;
  j["peak_rss_bytes"] = peak_rss_bytes;
  j["wall_seconds"] = wall_seconds;
  j["steps"] = steps;
  j["skipped_steps"] = skipped_steps;
  j["resumed_from_step"] = resumed_from_step;
  auto gens = [](const auto& v) {
    nlohmann::json a = nlohmann::json::array();
    for (const auto& [p, g] : v) a.push_back({{"prompt", p}, {"generation", g}});
    return a;
  };
  j["generations_before"] = gens(generations_before);
  j["generations_after"] = gens(generations_after);
  j["paths"] = paths;
  return j.dump(2) + "\n";
}

}  // namespace qlora::train
