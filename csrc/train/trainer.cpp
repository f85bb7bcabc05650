#include "qlora/train/trainer.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <ATen/ops/cross_entropy_loss.h>
#include <ATen/ops/from_blob.h>
#include <sys/resource.h>
#include <unistd.h>

#include <torch/nn/utils/clip_grad.h>
#include <torch/optim/adamw.h>
#include <torch/serialize.h>
#include <chrono>
#include <cmath>
#include <mutex>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "../util/fs.h"
#include "../util/log.h"
#include "metrics.h"
#include "qlora/data/dataset.h"
#include "qlora/io/atomic_file.h"
#include "qlora/models/loader.h"
#include "qlora/nn/apply_lora.h"
#include "qlora/nn/peft_adapter.h"
#include "qlora/optim/paged_adamw.h"
#include "qlora/tokenizers/tokenizer.h"
#include "qlora/train/lr_schedule.h"

namespace qlora::train {

at::Tensor summed_causal_lm_loss(const at::Tensor& logits, const at::Tensor& labels) {
  // Position t predicts token t + 1, as transformers' ForCausalLMLoss.
  const int64_t V = logits.size(-1);
  const at::Tensor shift_logits = logits.narrow(1, 0, logits.size(1) - 1).reshape({-1, V});
  const at::Tensor shift_labels = labels.narrow(1, 1, labels.size(1) - 1).reshape({-1});
  return at::cross_entropy_loss(shift_logits.to(at::kFloat), shift_labels, {}, at::Reduction::Sum,
                                -100);
}

int64_t count_label_tokens(const at::Tensor& labels) {
  return labels.narrow(1, 1, labels.size(1) - 1).ne(-100).sum().item<int64_t>();
}

namespace {

using Clock = std::chrono::steady_clock;

int64_t peak_rss_bytes() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<int64_t>(u.ru_maxrss) * 1024;
}

at::ScalarType dtype_named(const std::string& name) {
  if (name == "bfloat16") return at::kBFloat16;
  if (name == "float16") return at::kHalf;
  return at::kFloat;
}

data::PromptTemplate template_named(const std::string& name) {
  return data::PromptTemplate::from_name(name);
}

// The CPU generator drives LoRA dropout: saved so a resumed run draws the
// same masks an uninterrupted one would.
at::Tensor cpu_rng_state() {
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  return gen.get_state();
}

void set_cpu_rng_state(const at::Tensor& state) {
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  gen.set_state(state);
}

std::string checkpoint_name(int64_t step) { return "checkpoint-" + std::to_string(step); }

// Highest checkpoint-N in dir that is complete (renamed into place only once written).
std::optional<std::string> latest_checkpoint(const std::string& dir) {
  if (!fs::is_dir(dir)) return std::nullopt;
  int64_t best = -1;
  for (const auto& name : fs::list_dir(dir)) {
    if (name.rfind("checkpoint-", 0) != 0) continue;
    const std::string digits = name.substr(11);
    if (digits.empty() || digits.find_first_not_of("0123456789") != std::string::npos) continue;
    if (!fs::exists(dir + "/" + name + "/trainer_state.json")) continue;
    best = std::max<int64_t>(best, std::stoll(digits));
  }
  if (best < 0) return std::nullopt;
  return dir + "/" + checkpoint_name(best);
}

}  // namespace

struct Trainer::State {
  TrainConfig config;
  models::LlamaForCausalLM model{nullptr};
  std::unique_ptr<tokenizers::Tokenizer> tokenizer;
  std::shared_ptr<data::Dataset> train_set, eval_set;
  std::unique_ptr<data::DataLoader> loader;
  std::vector<at::Tensor> params;
  std::unique_ptr<torch::optim::Optimizer> optimizer;
  std::unique_ptr<LRSchedule> schedule;
  nn::LoRAConfig lora;
  MetricsWriter metrics;
  int64_t step = 0, total_steps = 0, skipped = 0, consecutive_nonfinite = 0;
  int64_t trained_tokens = 0;
  double train_seconds = 0;
  std::vector<std::string> paths;

  void setup();           // model and tokenizer
  void setup_training();  // data, optimizer, schedule, output folder
  void load_data();
  void build_optimizer();
  int64_t count_total_steps();
  bool train_step();
  std::vector<data::Batch> next_window();
  void save_checkpoint();
  void load_checkpoint(const std::string& dir);
  void prune_checkpoints();
  std::vector<std::pair<std::string, std::string>> generate_samples();
  std::vector<std::pair<std::string, std::string>> generate(const std::vector<std::string>& prompts,
                                                            int64_t max_new_tokens);
  bool prepared = false, training_prepared = false;
};

Trainer::Trainer(TrainConfig config) : s_(std::make_unique<State>()) {
  s_->config = std::move(config);
}

Trainer::~Trainer() = default;

void Trainer::State::setup() {
  if (prepared) return;
  prepared = true;
  const auto& c = config;
  if (c.training.threads > 0) at::set_num_threads(static_cast<int>(c.training.threads));
  torch::manual_seed(static_cast<uint64_t>(c.training.seed));

  lora.r = c.lora.r;
  lora.alpha = c.lora.alpha;
  lora.dropout = c.lora.dropout;
  lora.target_modules = c.lora.targets;
  lora.use_rslora = c.lora.rslora;
  lora.use_dora = c.lora.dora;
  models::LoadOptions load;
  load.lora = lora;
  load.format = c.model.format;
  if (c.model.quantize)
    load.quantize = nn::QuantizedBaseConfig{
        QuantConfig{c.model.blocksize, c.model.quant_type, c.model.double_quant},
        dtype_named(c.model.compute_dtype)};
  models::LoadReport report;
  const auto t0 = Clock::now();
  model = models::load_llama(c.model.path, load, &report);
  model->set_gradient_checkpointing(c.training.gradient_checkpointing,
                                    c.training.selective_recompute);
  std::ostringstream msg;
  msg << "loaded " << c.model.path << " (" << report.format << ") in "
      << std::chrono::duration<double>(Clock::now() - t0).count() << " s; ";
  if (report.lora) msg << *report.lora;
  log::info(msg.str());

  tokenizer =
      tokenizers::load_tokenizer(c.model.tokenizer.empty() ? c.model.path : c.model.tokenizer);
}

void Trainer::State::setup_training() {
  setup();
  if (training_prepared) return;
  training_prepared = true;
  const auto& c = config;
  load_data();
  build_optimizer();
  total_steps = count_total_steps();
  // Only now that everything loaded: a failed start leaves no output behind.
  fs::make_dirs(c.output_dir);
  log::add_file(c.output_dir + "/train.log");
  schedule = std::make_unique<LRSchedule>(c.training.scheduler, c.training.lr,
                                          c.training.warmup_steps, total_steps);
  metrics.open(c.output_dir);
}

void Trainer::State::load_data() {
  const auto& c = config;
  data::LoadOptions opts;
  opts.prompt_template = template_named(c.data.template_name);
  opts.tokenize.max_length = c.data.max_length;
  opts.strictness = c.data.strict ? data::Strictness::kReject : data::Strictness::kSkip;
  auto train = data::load_dataset(c.data.train, *tokenizer, opts);
  for (const auto& issue : train.issues) log::warn(issue.to_string());
  data::Dataset eval;
  if (!c.data.eval.empty()) {
    auto e = data::load_dataset(c.data.eval, *tokenizer, opts);
    for (const auto& issue : e.issues) log::warn(issue.to_string());
    eval = std::move(e.dataset);
  } else if (c.data.eval_split > 0) {
    auto split = train.dataset.split(c.data.eval_split, static_cast<uint64_t>(c.training.seed));
    train.dataset = std::move(split.train);
    eval = std::move(split.eval);
  }
  if (c.data.eval_max_examples > 0 &&
      static_cast<int64_t>(eval.size()) > c.data.eval_max_examples) {
    std::vector<data::Example> head(eval.examples().begin(),
                                    eval.examples().begin() + c.data.eval_max_examples);
    eval = data::Dataset(std::move(head));
  }
  if (train.dataset.empty()) throw std::runtime_error(c.data.train + ": no training examples");
  train_set = std::make_shared<data::Dataset>(std::move(train.dataset));
  eval_set = std::make_shared<data::Dataset>(std::move(eval));
  data::LoaderOptions lo;
  lo.micro_batch_size = c.training.micro_batch_size;
  lo.seed = static_cast<uint64_t>(c.training.seed);
  lo.packing = c.data.packing;
  lo.max_length = c.data.max_length;
  lo.pad_id = data::padding_id(*tokenizer);
  loader = std::make_unique<data::DataLoader>(train_set, lo);
  log::info("data: " + std::to_string(train_set->size()) + " training examples (" +
            std::to_string(train_set->num_label_tokens()) + " label tokens), " +
            std::to_string(eval_set->size()) + " eval examples");
}

void Trainer::State::build_optimizer() {
  const auto& t = config.training;
  // Tied weights appear twice in named_parameters(); an optimizer must see each once.
  std::set<c10::TensorImpl*> seen;
  for (const auto& p : model->parameters())
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
  model->train();
  int64_t label_tokens = 0, tokens = 0;
  for (const auto& b : window) {
    label_tokens += count_label_tokens(b.labels);
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
        model->summed_loss(b.input_ids, b.labels, b.attention_mask, positions, segments) /
        std::max<int64_t>(1, label_tokens);
    loss.backward();
    loss_sum += loss.item<double>();
  }
  const double lr = schedule->lr(step);
  for (auto& group : optimizer->param_groups()) group.options().set_lr(lr);
  double grad_norm = 0;
  const bool finite = std::isfinite(loss_sum);
  if (finite) {
    grad_norm = config.training.max_grad_norm > 0
                    ? torch::nn::utils::clip_grad_norm_(params, config.training.max_grad_norm)
                    : 0.0;
  }
  if (!finite || !std::isfinite(grad_norm)) {
    ++skipped;
    if (++consecutive_nonfinite > config.training.max_consecutive_nonfinite)
      throw std::runtime_error(
          "stopping: " + std::to_string(consecutive_nonfinite) +
          " consecutive steps with a non-finite loss or gradient (last at step " +
          std::to_string(step + 1) + "); lower training.lr or use float32 compute");
    log::warn("step " + std::to_string(step + 1) + ": non-finite loss/gradient, update skipped");
    optimizer->zero_grad();
  } else {
    consecutive_nonfinite = 0;
    optimizer->step();
  }
  ++step;
  const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  train_seconds += seconds;
  trained_tokens += tokens;
  metrics.train_step(step, total_steps, loss_sum, lr, grad_norm, tokens, seconds,
                     trained_tokens / std::max(1e-9, train_seconds), config.training.log_every);
  return true;
}

double Trainer::evaluate() {
  auto& s = *s_;
  s.setup_training();
  if (s.eval_set->empty()) return std::nan("");
  torch::NoGradGuard no_grad;
  s.model->eval();
  data::LoaderOptions lo;
  lo.micro_batch_size = s.config.training.micro_batch_size;
  lo.shuffle = false;
  lo.pad_id = data::padding_id(*s.tokenizer);
  data::DataLoader loader(s.eval_set, lo);
  double total = 0;
  int64_t tokens = 0;
  while (auto b = loader.next()) {
    total += s.model->summed_loss(b->input_ids, b->labels, b->attention_mask).item<double>();
    tokens += count_label_tokens(b->labels);
  }
  s.model->train();
  return total / std::max<int64_t>(1, tokens);
}

std::vector<std::pair<std::string, std::string>> Trainer::State::generate_samples() {
  return generate(config.generation.prompts, config.generation.max_new_tokens);
}

std::vector<std::pair<std::string, std::string>> Trainer::State::generate(
    const std::vector<std::string>& prompts, int64_t max_new_tokens) {
  std::vector<std::pair<std::string, std::string>> out;
  torch::NoGradGuard no_grad;
  model->eval();
  const auto tmpl = template_named(config.data.template_name);
  for (const auto& prompt : prompts) {
    data::Record r;
    r.instruction = prompt;
    const std::string text = tmpl.render(r).prompt;
    std::vector<int32_t> ids = tokenizer->encode(text, true);
    std::vector<int64_t> ids64(ids.begin(), ids.end());
    const at::Tensor input =
        at::from_blob(ids64.data(), {1, static_cast<int64_t>(ids64.size())}, at::kLong).clone();
    models::GenerationConfig g;
    g.max_new_tokens = max_new_tokens;
    if (tokenizer->eos_id()) g.stop_token_ids = std::vector<int64_t>{*tokenizer->eos_id()};
    const at::Tensor seq = model->generate(input, g);
    std::vector<int32_t> fresh;
    for (int64_t i = input.size(1); i < seq.size(1); ++i) {
      const int32_t id = static_cast<int32_t>(seq[0][i].item<int64_t>());
      if (tokenizer->eos_id() && id == *tokenizer->eos_id()) break;
      fresh.push_back(id);
    }
    out.emplace_back(prompt, tokenizer->decode(fresh, true));
  }
  model->train();
  return out;
}

void Trainer::State::save_checkpoint() {
  const std::string final_dir = config.output_dir + "/" + checkpoint_name(step);
  const std::string tmp =
      config.output_dir + "/.tmp-" + checkpoint_name(step) + "-" + std::to_string(getpid());
  fs::remove_tree(tmp);
  fs::make_dirs(tmp);
  nn::save_peft_adapter(tmp + "/adapter", *model, lora, {config.model.path});
  {
    torch::serialize::OutputArchive archive;
    optimizer->save(archive);
    archive.write("rng_state", cpu_rng_state());
    std::ostringstream bytes;
    archive.save_to(bytes);
    const std::string b = bytes.str();
    io::write_bytes_atomic(tmp + "/optimizer.pt", b.data(), b.size());
  }
  nlohmann::json state;
  state["step"] = step;
  state["total_steps"] = total_steps;
  state["skipped_steps"] = skipped;
  state["consecutive_nonfinite"] = consecutive_nonfinite;
  state["trained_tokens"] = trained_tokens;
  state["train_seconds"] = train_seconds;
  state["data"] = nlohmann::json::parse(loader->state().to_json());
  const std::string cfg = config.to_yaml();
  io::write_bytes_atomic(tmp + "/config.yaml", cfg.data(), cfg.size());
  const std::string st = state.dump(2) + "\n";
  io::write_bytes_atomic(tmp + "/trainer_state.json", st.data(), st.size());
  fs::remove_tree(final_dir);  // a re-run of the same step replaces it
  fs::rename_durably(tmp, final_dir);
  metrics.checkpoint(step);
  log::info("saved " + final_dir);
  prune_checkpoints();
}

// Keeps the newest keep_last complete checkpoints and removes the remains
// of writes that a killed run cut short.
void Trainer::State::prune_checkpoints() {
  std::vector<int64_t> steps;
  for (const auto& name : fs::list_dir(config.output_dir)) {
    const std::string path = config.output_dir + "/" + name;
    if (name.rfind(".tmp-checkpoint-", 0) == 0) {
      fs::remove_tree(path);
    } else if (name.rfind("checkpoint-", 0) == 0 &&
               name.find_first_not_of("0123456789", 11) == std::string::npos) {
      if (fs::exists(path + "/trainer_state.json"))
        steps.push_back(std::stoll(name.substr(11)));
      else
        fs::remove_tree(path);
    }
  }
  std::sort(steps.begin(), steps.end());
  while (static_cast<int64_t>(steps.size()) > config.training.keep_last) {
    fs::remove_tree(config.output_dir + "/" + checkpoint_name(steps.front()));
    steps.erase(steps.begin());
  }
}

void Trainer::State::load_checkpoint(const std::string& dir) {
  const auto state = nlohmann::json::parse(fs::read_file(dir + "/trainer_state.json"));
  nn::load_peft_adapter(dir + "/adapter", *model);
  torch::serialize::InputArchive archive;
  archive.load_from(dir + "/optimizer.pt");
  optimizer->load(archive);
  at::Tensor rng;
  archive.read("rng_state", rng);
  set_cpu_rng_state(rng);
  step = state.at("step").get<int64_t>();
  skipped = state.at("skipped_steps").get<int64_t>();
  consecutive_nonfinite = state.at("consecutive_nonfinite").get<int64_t>();
  trained_tokens = state.at("trained_tokens").get<int64_t>();
  train_seconds = state.at("train_seconds").get<double>();
  loader->restore(data::LoaderState::from_json(state.at("data").dump()));
  metrics.truncate_after(step);
  log::info("resumed from " + dir + " at step " + std::to_string(step));
}

void Trainer::prepare() { s_->setup_training(); }

models::LlamaForCausalLM& Trainer::model() {
  s_->setup();
  return s_->model;
}

const nn::LoRAConfig& Trainer::lora_config() const { return s_->lora; }

const TrainConfig& Trainer::config() const { return s_->config; }

void Trainer::load_adapter(const std::string& dir) {
  s_->setup();
  nn::load_peft_adapter(dir, *s_->model);
}

std::vector<std::pair<std::string, std::string>> Trainer::generate(
    const std::vector<std::string>& prompts, int64_t max_new_tokens) {
  s_->setup();
  return s_->generate(prompts, max_new_tokens);
}

TrainSummary Trainer::run() {
  auto& s = *s_;
  const auto start = Clock::now();
  s.setup_training();
  TrainSummary summary;
  std::optional<std::string> resume_dir;
  if (s.config.resume == "auto")
    resume_dir = latest_checkpoint(s.config.output_dir);
  else if (s.config.resume != "none")
    resume_dir = s.config.resume;
  if (resume_dir) {
    s.load_checkpoint(*resume_dir);
    summary.resumed_from_step = s.step;
  }
  summary.eval_loss_before = evaluate();
  s.metrics.eval(s.step, summary.eval_loss_before);
  summary.generations_before = s.generate_samples();
  while (s.step < s.total_steps && s.train_step()) {
    const auto& t = s.config.training;
    if (t.eval_every > 0 && s.step % t.eval_every == 0 && s.step < s.total_steps)
      s.metrics.eval(s.step, evaluate());
    if (t.save_every > 0 && s.step % t.save_every == 0 && s.step < s.total_steps)
      s.save_checkpoint();
  }
  s.save_checkpoint();
  summary.eval_loss_after = evaluate();
  s.metrics.eval(s.step, summary.eval_loss_after);
  summary.generations_after = s.generate_samples();
  const std::string adapter_dir = s.config.output_dir + "/adapter";
  nn::save_peft_adapter(adapter_dir, *s.model, s.lora, {s.config.model.path});
  summary.steps = s.step;
  summary.skipped_steps = s.skipped;
  summary.tokens_per_second = s.trained_tokens / std::max(1e-9, s.train_seconds);
  summary.peak_rss_bytes = peak_rss_bytes();
  summary.wall_seconds = std::chrono::duration<double>(Clock::now() - start).count();
  summary.paths = {adapter_dir, s.config.output_dir + "/" + checkpoint_name(s.step),
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
