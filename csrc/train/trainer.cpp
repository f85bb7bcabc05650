#include "qlora/train/trainer.h"

#include <sys/resource.h>

#include <torch/nn/utils/clip_grad.h>
#include <torch/optim/adamw.h>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>

#include "qlora/data/data_loader.h"
#include "qlora/dist/communicator.h"
#include "qlora/dist/gradient_reducer.h"
#include "qlora/io/atomic_file.h"
#include "qlora/nn/hash_dropout.h"
#include "qlora/nn/peft_adapter.h"
#include "qlora/optim/paged_adamw.h"
#include "qlora/train/device.h"
#include "qlora/train/lr_schedule.h"
#include "qlora/train/stop_signals.h"
#include "train/checkpoint.h"
#include "train/label_tokens.h"
#include "train/metrics.h"
#include "train/output_folder.h"
#include "util/fs.h"
#include "util/log.h"
#include "util/rng_state.h"

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
  std::vector<std::string> param_names;  // beside params: for messages
  std::unique_ptr<torch::optim::Optimizer> optimizer;
  std::unique_ptr<LRSchedule> schedule;
  MetricsWriter metrics;
  detail::LoopState loop;
  GradientHook gradient_hook;
  int64_t saved_step = -1;  // the step of the last checkpoint written or resumed from
  bool training_prepared = false;
  // Data parallelism, when a launcher set WORLD_SIZE: the process group and
  // the gradient all-reduce. Rank 0 alone writes files.
  std::unique_ptr<dist::Communicator> comm;
  std::unique_ptr<dist::GradientReducer> reducer;
  std::vector<int> owner;   // ZeRO-1: the rank that updates each parameter
  double comm_seconds = 0;  // waiting in collectives after backward, this process
  int64_t steps_run = 0;    // optimizer steps this process ran (not resumed ones)

  bool main_rank() const { return !comm || comm->rank() == 0; }
  // NCCL moves CUDA tensors only: small host values (counts, losses,
  // generator states) travel through the training device and come back.
  c10::Device comm_device = c10::kCPU;
  at::Tensor to_comm(const at::Tensor& t) const { return t.to(comm_device); }
  bool sharded() const { return comm && config.training.distributed.shard_optimizer; }
  optim::PagedAdamW& paged() { return dynamic_cast<optim::PagedAdamW&>(*optimizer); }
  void partition_parameters();
  void gather_optimizer_states();
  void drop_foreign_optimizer_states();
  void step_sharded();
  int64_t rank() const { return comm ? comm->rank() : 0; }
  int64_t world_size() const { return comm ? comm->world_size() : 1; }
  void connect();
  // The stop signal any rank received (all ranks call it at the same points).
  int agreed_stop_signal();
  std::optional<std::string> agreed_resume_dir();

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
  double evaluate();
  std::vector<std::pair<std::string, std::string>> generate_samples() {
    return ctx().generate(config.generation.prompts, config.generation.max_new_tokens);
  }
};

Trainer::Trainer(TrainConfig config) : s_(std::make_unique<State>()) {
  s_->config = std::move(config);
}

Trainer::~Trainer() = default;

void Trainer::State::connect() {
  const auto world = dist::WorldInfo::from_environment();
  if (!world) return;
  const auto& d = config.training.distributed;
  // One GPU per local rank: "auto" and "cuda" become cuda:LOCAL_RANK.
  const c10::Device device = resolve_device(config.training.device);
  if (device.is_cuda() && (config.training.device == "auto" || config.training.device == "cuda"))
    config.training.device = "cuda:" + std::to_string(world->local_rank);
  const std::string backend = dist::resolve_backend(d.backend, device.is_cuda() ? "cuda" : "cpu");
  if (device.is_cuda()) make_current(resolve_device(config.training.device));
  if (backend == "nccl") comm_device = resolve_device(config.training.device);
  const auto timeout = std::chrono::milliseconds(static_cast<int64_t>(d.timeout_seconds * 1000));
  comm = dist::Communicator::connect(*world, backend, timeout);
  log::set_worker_rank(world->rank);
  // One generator state on every rank (one checkpoint restores them all), a
  // dropout stream of its own per rank.
  nn::set_hash_dropout_stream(static_cast<uint64_t>(world->rank));
  log::info("data parallel: rank " + std::to_string(world->rank) + " of " +
            std::to_string(world->world_size) + " over " + backend + " (c10d), rendezvous " +
            world->master_addr + ":" + std::to_string(world->master_port));
}

// ZeRO-1: parameters go to the least loaded rank in order (the same on every rank).
void Trainer::State::partition_parameters() {
  std::vector<int64_t> load(static_cast<size_t>(world_size()), 0);
  owner.clear();
  for (const auto& p : params) {
    const auto r = std::min_element(load.begin(), load.end()) - load.begin();
    owner.push_back(static_cast<int>(r));
    load[r] += p.numel();
  }
}

// Updates this rank's parameters (the others' gradients are dropped, so
// PagedAdamW neither updates them nor creates their state), then every
// parameter comes from its owner.
void Trainer::State::step_sharded() {
  for (size_t i = 0; i < params.size(); ++i)
    if (owner[i] != rank()) params[i].mutable_grad() = at::Tensor();
  optimizer->step();
  torch::NoGradGuard no_grad;
  for (size_t i = 0; i < params.size(); ++i) {
    at::Tensor data = params[i].detach();
    comm->broadcast(data, owner[i]);
  }
}

// Before a checkpoint: rank 0 receives every other rank's parameter states,
// so the file holds the whole optimizer as an unsharded run writes it.
void Trainer::State::gather_optimizer_states() {
  for (size_t i = 0; i < params.size(); ++i) {
    const int o = owner[i];
    if (o == 0) continue;
    std::vector<at::Tensor> state;
    if (rank() == o) state = paged().export_param_state(params[i]);
    at::Tensor head = at::zeros({11}, at::kLong);  // count, then (numel, dtype) per tensor
    if (rank() == o) {
      head[0] = static_cast<int64_t>(state.size());
      for (size_t k = 0; k < state.size(); ++k) {
        head[1 + 2 * k] = state[k].numel();
        head[2 + 2 * k] = static_cast<int64_t>(state[k].scalar_type());
      }
    }
    head = to_comm(head);
    comm->broadcast(head, o);
    head = head.cpu();
    const int64_t n = head[0].item<int64_t>();
    std::vector<at::Tensor> received;
    for (int64_t k = 0; k < n; ++k) {
      at::Tensor t =
          rank() == o
              ? to_comm(state[k].reshape({-1}).contiguous())
              : at::empty({head[1 + 2 * k].item<int64_t>()},
                          at::TensorOptions()
                              .dtype(static_cast<at::ScalarType>(head[2 + 2 * k].item<int64_t>()))
                              .device(comm_device));
      comm->broadcast(t, o);
      received.push_back(t.cpu());
    }
    if (rank() == 0 && n > 0) {
      received[1] = received[1].view(params[i].sizes());
      received[2] = received[2].view(params[i].sizes());
      paged().import_param_state(params[i], received);
    }
  }
}

void Trainer::State::drop_foreign_optimizer_states() {
  for (size_t i = 0; i < params.size(); ++i)
    if (owner[i] != rank()) paged().drop_param_state(params[i]);
}

int Trainer::State::agreed_stop_signal() {
  const int mine = pending_stop_signal();
  if (!comm) return mine;
  at::Tensor sig = to_comm(at::full({1}, mine, at::kLong));
  comm->all_reduce_max(sig);
  return static_cast<int>(sig.item<int64_t>());
}

// Rank 0 picks the checkpoint; every rank must see that same folder.
std::optional<std::string> Trainer::State::agreed_resume_dir() {
  std::optional<std::string> dir;
  if (config.resume == "auto")
    dir = detail::find_latest_checkpoint(config.output_dir);
  else if (config.resume != "none")
    dir = config.resume;
  if (!comm) return dir;
  int64_t step = -1;
  if (dir && config.resume == "auto") step = std::stoll(dir->substr(dir->rfind('-') + 1));
  at::Tensor t = to_comm(at::full({1}, step, at::kLong));
  comm->broadcast(t, 0);
  step = t.item<int64_t>();
  if (config.resume != "auto") return dir;  // none, or the same named folder everywhere
  if (step < 0) {
    if (dir)
      throw std::runtime_error("rank " + std::to_string(rank()) + " sees checkpoint " + *dir +
                               " but rank 0 sees none in " + config.output_dir +
                               ": output_dir must be one shared folder");
    return std::nullopt;
  }
  const std::string agreed = config.output_dir + "/" + detail::checkpoint_name(step);
  if (!fs::is_dir(agreed))
    throw std::runtime_error("rank " + std::to_string(rank()) + ": rank 0 resumes from " + agreed +
                             ", which this rank cannot see: output_dir must be one "
                             "folder shared by every rank");
  return agreed;
}

double Trainer::State::evaluate() {
  if (!comm) return ctx().evaluate(data.eval, config.training.micro_batch_size);
  auto [total, tokens] =
      ctx().evaluate_sums(data.eval, config.training.micro_batch_size, rank(), world_size());
  at::Tensor sums = to_comm(at::tensor({total, static_cast<double>(tokens)}, at::kDouble));
  comm->all_reduce_sum(sums);
  sums = sums.cpu();
  if (sums[1].item<double>() == 0) return std::nan("");
  return sums[0].item<double>() / sums[1].item<double>();
}

void Trainer::State::setup_training() {
  if (training_prepared) return;
  connect();
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
  lo.num_shards = world_size();
  lo.shard = rank();
  loader = std::make_unique<data::DataLoader>(data.train, lo);
  build_optimizer();
  if (comm) {
    const double bytes = config.training.distributed.bucket_mb * (1 << 20);
    reducer = std::make_unique<dist::GradientReducer>(*comm, params, static_cast<int64_t>(bytes));
    if (sharded()) partition_parameters();
  }
  loop.total_steps = count_total_steps();
  const auto& t = config.training;
  schedule = std::make_unique<LRSchedule>(t.scheduler, t.lr, t.warmup_steps, loop.total_steps);
  // Only now that everything loaded: a failed start leaves no output behind.
  if (main_rank()) {
    fs::make_dirs(config.output_dir);
    log::add_file(config.output_dir + "/train.log");
    metrics.open(config.output_dir);
  }
  if (comm) comm->barrier();  // the output folder exists before any rank looks into it
  training_prepared = true;
}

void Trainer::State::build_optimizer() {
  const auto& t = config.training;
  // Tied weights appear twice in named_parameters(); an optimizer must see each once.
  std::set<c10::TensorImpl*> seen;
  for (const auto& item : ctx().model->named_parameters()) {
    const at::Tensor& p = item.value();
    if (p.requires_grad() && seen.insert(p.unsafeGetTensorImpl()).second) {
      params.push_back(p);
      param_names.push_back(item.key());
    }
  }
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
  int64_t label_tokens = 0, tokens = 0;
  for (const auto& b : window) {
    label_tokens += detail::count_label_tokens(b.labels);
    tokens += b.attention_mask.sum().item<int64_t>();
  }
  if (comm) {
    // The loss is normalised by the step's label tokens over all ranks, so N
    // ranks of m rows train exactly as one process of N * m rows.
    at::Tensor counts =
        to_comm(at::tensor({label_tokens, tokens, static_cast<int64_t>(window.size())}));
    comm->all_reduce_sum(counts);
    counts = counts.cpu();
    label_tokens = counts[0].item<int64_t>();
    tokens = counts[1].item<int64_t>();
    if (counts[2].item<int64_t>() == 0) return false;
  } else if (window.empty()) {
    return false;
  }
  ctx().model->train();
  const auto t0 = Clock::now();
  optimizer->zero_grad();
  double loss_sum = 0;
  for (size_t i = 0; i < window.size(); ++i) {
    const data::Batch& b = window[i];
    if (reducer && i + 1 == window.size()) reducer->prepare_for_backward();
    if (b.input_ids.size(0) == 0) continue;  // this rank's share of a short last step
    const c10::Device dev = ctx().device;
    std::optional<at::Tensor> positions, segments;
    if (config.data.packing) {
      positions = b.position_ids.to(dev);
      segments = b.segment_ids.to(dev);
    }
    const at::Tensor loss =
        ctx().model->summed_loss(b.input_ids.to(dev), b.labels.to(dev), b.attention_mask.to(dev),
                                 positions, segments) /
        std::max<int64_t>(1, label_tokens);
    loss.backward();
    loss_sum += loss.item<double>();
  }
  if (reducer) {
    const auto c0 = Clock::now();
    reducer->finish();  // every rank now holds the summed gradient
    at::Tensor l = to_comm(at::full({1}, loss_sum, at::kDouble));
    comm->all_reduce_sum(l);
    loss_sum = l.item<double>();
    // A rank whose share of a short last step was empty drew fewer dropout
    // seeds: rank 0's generator state becomes everyone's again, so the one
    // checkpoint rank 0 writes restores every rank exactly.
    util::RngState rng = util::RngState::capture();
    at::Tensor state = to_comm(rng.cpu);
    comm->broadcast(state, 0);
    rng.cpu = state.cpu();
    rng.restore();
    comm_seconds += std::chrono::duration<double>(Clock::now() - c0).count();
  }
  ++steps_run;
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
    if (sharded())
      step_sharded();
    else
      optimizer->step();
  }
  ++loop.step;
  const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  loop.train_seconds += seconds;
  loop.trained_tokens += tokens;
  if (main_rank())
    metrics.train_step(loop.step, loop.total_steps, loss_sum, lr, grad_norm, tokens, seconds,
                       loop.trained_tokens / std::max(1e-9, loop.train_seconds),
                       config.training.log_every);
  return true;
}

detail::CheckpointParts Trainer::State::checkpoint_parts(const std::string& config_yaml) {
  return {ctx().model, ctx().lora, config.model.path, *optimizer, config_yaml, ctx().device};
}

std::string Trainer::State::save_checkpoint() {
  if (sharded()) gather_optimizer_states();
  if (!main_rank()) {  // rank 0 writes the one checkpoint every rank resumes from
    saved_step = loop.step;
    return config.output_dir + "/" + detail::checkpoint_name(loop.step);
  }
  loop.data_state_json = loader->state().to_json();
  const std::string yaml = config.to_yaml();
  std::string dir;
  try {
    dir = detail::save_checkpoint(config.output_dir, checkpoint_parts(yaml), loop);
  } catch (...) {
    if (sharded()) drop_foreign_optimizer_states();
    throw;
  }
  if (sharded()) drop_foreign_optimizer_states();
  saved_step = loop.step;
  metrics.checkpoint(loop.step);
  log::info("saved " + dir);
  try {  // housekeeping: the checkpoint just saved is what matters
    detail::prune_checkpoints(config.output_dir, config.training.keep_last);
  } catch (const std::exception& e) {
    log::warn(std::string("old checkpoints not pruned: ") + e.what() + "; training goes on");
  }
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
  if (sharded()) drop_foreign_optimizer_states();  // every rank loaded the whole state
  if (main_rank()) metrics.truncate_after(loop.step);
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
  const std::optional<std::string> resume_dir = s.agreed_resume_dir();
  if (resume_dir) {
    s.resume_from(*resume_dir);
    summary.resumed_from_step = s.loop.step;
  }
  if (s.comm) dist::check_identical(*s.comm, s.params, s.param_names);
  summary.eval_loss_before = s.evaluate();
  if (s.main_rank()) {
    s.metrics.eval(s.loop.step, summary.eval_loss_before);
    summary.generations_before = s.generate_samples();
  }
  const auto& t = s.config.training;
  while (s.loop.step < s.loop.total_steps) {
    if (const int sig = s.agreed_stop_signal()) s.stop_for_signal(sig);
    if (!s.train_step()) break;
    const int64_t step = s.loop.step;
    if (t.save_every > 0 && step % t.save_every == 0 && step < s.loop.total_steps)
      s.save_checkpoint();
    if (const int sig = s.agreed_stop_signal()) s.stop_for_signal(sig);
    if (t.eval_every > 0 && step % t.eval_every == 0 && step < s.loop.total_steps) {
      const double loss = s.evaluate();
      if (s.main_rank()) s.metrics.eval(step, loss);
    }
  }
  s.save_checkpoint();
  if (const int sig = s.agreed_stop_signal()) s.stop_for_signal(sig);
  summary.eval_loss_after = s.evaluate();
  const std::string adapter_dir = s.config.output_dir + "/adapter";
  if (s.main_rank()) {
    s.metrics.eval(s.loop.step, summary.eval_loss_after);
    summary.generations_after = s.generate_samples();
    detail::write_into_output_folder(s.config.output_dir, adapter_dir, [&] {
      nn::save_peft_adapter(adapter_dir, *s.ctx().model, s.ctx().lora, {s.config.model.path});
    });
  }
  summary.steps = s.loop.step;
  summary.skipped_steps = s.loop.skipped_steps;
  summary.tokens_per_second = s.loop.trained_tokens / std::max(1e-9, s.loop.train_seconds);
  summary.peak_rss_bytes = peak_rss_bytes();
  summary.device = s.ctx().device.str();
  summary.peak_device_bytes = peak_device_allocated_bytes(s.ctx().device);
  summary.world_size = s.world_size();
  if (auto* paged = dynamic_cast<optim::PagedAdamW*>(s.optimizer.get()))
    summary.optimizer_state_bytes = paged->state_bytes();
  summary.communication_seconds_per_step = s.comm_seconds / std::max<int64_t>(1, s.steps_run);
  summary.wall_seconds = std::chrono::duration<double>(Clock::now() - start).count();
  if (s.main_rank())
    summary.paths = {adapter_dir, s.config.output_dir + "/" + detail::checkpoint_name(s.loop.step),
                     s.metrics.path(), s.metrics.plot()};
  if (s.main_rank()) {
    const std::string json = summary.to_json();
    const std::string path = s.config.output_dir + "/summary.json";
    detail::write_into_output_folder(
        s.config.output_dir, path, [&] { io::write_bytes_atomic(path, json.data(), json.size()); });
  }
  // Nobody leaves before rank 0 has written everything (a launcher's exit
  // means the run's files are complete).
  if (s.comm) s.comm->barrier();
  return summary;
}

std::string TrainSummary::to_json() const {
  nlohmann::json j;
  j["eval_loss_before"] = eval_loss_before;
  j["eval_loss_after"] = eval_loss_after;
  j["tokens_per_second"] = tokens_per_second;
  j["peak_rss_bytes"] = peak_rss_bytes;
  j["device"] = device;
  j["peak_device_bytes"] = peak_device_bytes;
  j["wall_seconds"] = wall_seconds;
  j["steps"] = steps;
  j["skipped_steps"] = skipped_steps;
  j["resumed_from_step"] = resumed_from_step;
  j["world_size"] = world_size;
  j["optimizer_state_bytes"] = optimizer_state_bytes;
  j["communication_seconds_per_step"] = communication_seconds_per_step;
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
